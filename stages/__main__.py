"""`python -m stages <stage> [model]`: the one entry point of every DVC stage.

It hands the stage to the warm stage server of this venv when one runs (pipeline/warm.py: a
child forked from a process with torch and mlflow loaded runs this same module, and this
process relays signals and exits with its status). Loading only the handing-off code keeps
this process at about 0.06 s of CPU, against 0.18 s with params.yaml's schema (pydantic, the
model modules) loaded too: the child checks the file, as the first thing it does.
Else, or in that child, it reads params.yaml first, with only light modules loaded, so a bad
file costs a fraction of a second and one line (exit 2), before anything is started;
`params`, the stage that depends on the whole file (so `dvc repro` reports an unknown key even
when no other stage would run), ends there and never hands off. Then it imports the stage
module, whose imports (torch, mlflow) sit at its top: this is the one lazy boundary. Known
failures end as one line and exit 1; Ctrl-C and SIGTERM as one line naming what the stage had
already written, and exit 130.
"""

from __future__ import annotations

import importlib
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from pipeline import warm
from pipeline.errors import PipelineError, fail, interrupted, raise_interrupt

if TYPE_CHECKING:
    from pipeline import config

warm.stage_environment()  # before torch loads: the same settings here and in the warm server

USAGE = "usage: python -m stages {params,generate,train <model>,evaluate}  (<model>: one of params.yaml's models)"


def written_since(outputs: Sequence[Path], since: float) -> list[str]:
    """The outputs (files, or files in folders) modified at or after `since`: what a stage has written so far."""
    found = []
    for out in outputs:
        files = [out] if out.is_file() else sorted(f for f in out.rglob("*") if f.is_file()) if out.is_dir() else []
        if any(f.stat().st_mtime >= since for f in files):
            found.append(str(out))
    return found


def parse(argv: Sequence[str]) -> tuple[str, list[str]] | None:
    """(stage module, its arguments) from the command line's shape, None when it is not one of the stages (a model's
    name is checked with params.yaml, `checked`)."""
    if list(argv[:1]) in (["params"], ["generate"], ["evaluate"]) and len(argv) == 1:
        return argv[0], []
    if len(argv) == 2 and argv[0] == "train":
        return "train", [argv[1]]
    return None


def checked(stage: str, args: list[str], label: str) -> config.Config:
    """params.yaml, valid, and the model a train stage names in its `models`; else one line and exit 2."""
    from pipeline import config, zoo

    if stage == "train" and not zoo.NAME.match(args[0]):
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    try:
        cfg = config.load()
    except PipelineError as exc:
        fail(label, exc, 2)
    if stage == "train" and args[0] not in cfg.models:
        listed = ", ".join(cfg.models)
        fail(label, PipelineError(f"no model {args[0]!r} in {config.PARAMS_FILE}'s models ({listed})"), 2)
    return cfg


def load_stage(stage: str, cfg: config.Config) -> ModuleType:
    """The lazy boundary: import the stage module (torch, mlflow) once params.yaml is known to be valid.

    `device: cuda` on a machine without CUDA is refused here, with torch loaded but not mlflow.
    """
    if stage == "train" and cfg.device == "cuda":
        from pipeline.device import resolve_device

        resolve_device(cfg.device)
    return importlib.import_module(f"stages.{stage}")


def main(argv: Sequence[str] | None = None) -> None:
    """Validate params.yaml, run the stage, and turn known failures into one line and an exit code."""
    parsed = parse(sys.argv[1:] if argv is None else argv)
    if parsed is None:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    stage, args = parsed
    label = "@".join([stage, *args])
    started = time.time() - 1  # mtime granularity: a file written in the first second still counts
    signal.signal(signal.SIGTERM, raise_interrupt)  # SIGTERM ends the MLflow run as KILLED, like Ctrl-C
    outputs: list[Path] = []
    if stage != "params" and argv is None:  # a bad params.yaml starts no server: the check comes first
        code = warm.handoff(label, before_start=lambda: checked(stage, args, label))
        if code is not None:
            sys.exit(code)  # the stage ran in a warm server's child (pipeline/warm.py), with this process's streams
    cfg = checked(stage, args, label)
    if stage == "params":  # dvc.yaml's check of the whole file: valid, nothing more to do
        return
    try:
        module = load_stage(stage, cfg)
        outputs = module.outputs(*args)
        module.run(cfg, *args)
    except PipelineError as exc:
        fail(label, exc, 1)
    except KeyboardInterrupt as exc:
        written = written_since(outputs, started)
        outcome = (
            f"already written: {', '.join(written)} (DVC does not record them; the next `dvc repro` runs the stage again)"
            if written else "no output was written"
        )
        print(f"{label}: {interrupted(exc)}; {outcome}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
