"""What every stage entry point shares: config first, one-line errors, signals, paths.

Only light modules are imported here, so a bad params.yaml is reported in well
under a second, before torch or mlflow are loaded.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from pipeline import config
from pipeline.errors import PipelineError

DATA = Path("data")
MODELS = Path("models")
METRICS = Path("metrics")
PLOTS = Path("plots")


def weights_path(model: str) -> Path:
    """Where a train stage writes its weights (a DVC output)."""
    return MODELS / f"{model}.safetensors"


def loss_plot_path(model: str, suffix: str = ".csv") -> Path:
    """Where a train stage writes its loss curves (DVC plots: .csv data, .png picture)."""
    return PLOTS / "loss" / f"{model}{suffix}"


def split_path(split: str) -> Path:
    """Where generate writes one split."""
    return DATA / f"{split}.parquet"


def data_digests() -> dict[str, str]:
    """md5 of each split file (as in dvc.lock), keyed by split."""
    from pipeline.data import SPLITS
    from pipeline.files import md5_file

    return {split: md5_file(split_path(split)) for split in SPLITS}


def run_name(stage: str) -> str:
    """Readable MLflow run name: the stage, plus the DVC experiment when there is one."""
    exp = os.environ.get("DVC_EXP_NAME")
    return f"{stage} [{exp}]" if exp else stage


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def written_since(outputs: Sequence[Path], since: float) -> list[str]:
    """The outputs (files, or files in folders) modified at or after `since`: what a stage has written so far."""
    found = []
    for out in outputs:
        files = [out] if out.is_file() else sorted(f for f in out.rglob("*") if f.is_file()) if out.is_dir() else []
        if any(f.stat().st_mtime >= since for f in files):
            found.append(str(out))
    return found


def main(stage: str, body: Callable[[config.Config], None], outputs: Sequence[Path] = ()) -> None:
    """Validate params.yaml, run the stage body, and turn known failures into one line + exit code.

    The line on an interruption names the `outputs` this run had already written,
    since DVC records none of them when the stage fails.
    """
    started = time.time() - 1  # mtime granularity: a file written in the first second still counts
    signal.signal(signal.SIGTERM, _terminate)  # SIGTERM ends the MLflow run as KILLED, like Ctrl-C
    try:
        cfg = config.load()
    except PipelineError as exc:
        print(f"{stage}: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        body(cfg)
    except PipelineError as exc:
        print(f"{stage}: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        written = written_since(outputs, started)
        outcome = (
            f"already written: {', '.join(written)} (DVC does not record them; the next `dvc repro` runs the stage again)"
            if written else "no output was written"
        )
        print(f"{stage}: interrupted ({str(exc) or 'Ctrl-C'}); {outcome}", file=sys.stderr)
        sys.exit(130)
