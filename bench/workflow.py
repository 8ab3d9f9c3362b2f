"""Figures measured on whole stages and DVC commands, in throwaway git+DVC copies of the project."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bench.report import Row
from bench.workspace import ROOT, copy_project, set_params, timed

PY = sys.executable


def _best(repeats: int, repo: Path, commands: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """Shortest wall time of each command over `repeats` interleaved runs."""
    best = {name: float("inf") for name in commands}
    for _ in range(repeats):
        for name, cmd in commands.items():
            best[name] = min(best[name], timed(repo, *cmd).seconds)
    return best


def user_loop(repo: Path, repeats: int, cold: float, bare_mlp: float) -> tuple[list[Row], dict[str, float]]:
    """The cold `dvc repro` (timed before), the rerun after mlp.lr changes (against the bare MLP script), a no-op repro.

    Returns the rows and the seconds the floors are set against: `rerun`, and `noop` (DVC's own share of every repro).
    """
    lr = yaml.safe_load((repo / "params.yaml").read_text())["mlp"]["lr"]
    set_params(repo, {"mlp.lr": lr / 2})
    rerun = timed(repo, PY, "-m", "dvc", "repro")
    ran = re.findall(r"Running stage '([^']+)'", rerun.stdout)
    best = _best(repeats, repo, {
        "repro": (PY, "-m", "dvc", "repro"),
        "status": (PY, "-m", "dvc", "status"),
    })
    return [
        Row("cold dvc repro (5 stages)", cold, None, "s", target=("<=", 24)),
        Row("dvc repro after mlp.lr changed", rerun.seconds, bare_mlp, "s", "bare MLP script", ("<=", 2.2),
            note=f"{rerun.seconds / cold:.2f}x the cold repro"),
        Row("  stages rerun after mlp.lr changed", len(ran), None, "stages", target=("==", 2), note=", ".join(ran)),
        Row("no-op dvc repro", best["repro"], best["status"], "s", "dvc status", ("<=", 1.3)),
    ], {"rerun": rerun.seconds, "noop": best["repro"]}


def train_stage(repo: Path, repeats: int) -> tuple[Row, float]:
    """`python -m stages train mlp` (the whole stage, tracked) against a bare script doing the same training.

    The bare script (bench/bare_train.py) reads the Parquet splits, runs an eager loop for as
    many epochs as the stage ran (early stopping included), and saves the weights. Returns the
    row and the bare script's seconds (the baseline of the rerun row too).
    """
    timed(repo, PY, "-m", "stages", "train", "mlp")  # warm the store and the file cache; learn the epochs run
    epochs = json.loads((repo / "metrics" / "train" / "mlp.json").read_text())["steps_run"]
    best = _best(repeats, repo, {
        "stage": (PY, "-m", "stages", "train", "mlp"),
        "bare": (PY, str(ROOT / "bench" / "bare_train.py"), str(epochs), str(repo / "bare.safetensors")),
    })
    row = Row("train@mlp stage", best["stage"], best["bare"], "s", "bare script (read, eager loop, save)", ("<=", 1.5),
              f"{epochs} epochs in both")
    return row, best["bare"]


def startup(repo: Path, repeats: int) -> tuple[list[Row], dict[str, float]]:
    """A stage's fixed cost (train@linear_gd with one step) against importing torch and mlflow and opening the store.

    Returns the rows and the floors measured for them: `floor` (a stage process's imports and
    store open) and `bare_imports` (what the bare training script imports).
    """
    set_params(repo, {"linear_gd.steps": 1})
    store = f"sqlite:///{repo / 'mlflow.db'}"
    floor = f"import torch, mlflow; from mlflow.tracking import MlflowClient; MlflowClient({store!r}).search_experiments()"
    best = _best(repeats, repo, {
        "stage": (PY, "-m", "stages", "train", "linear_gd"),
        "floor": (PY, "-c", floor),
        "imports": (PY, "-c", "import torch, mlflow"),
        "seed": (PY, "-c", "import torch; from pipeline.device import seed_everything; seed_everything(0)"),
        "public": (PY, "-c", "import torch; torch.use_deterministic_algorithms(True, warn_only=True)"),
        "bare_imports": (PY, "-c", "import pyarrow.parquet, torch, yaml, safetensors.torch"),
    })
    return [
        Row("stage start-up (1-step train@linear_gd)", best["stage"], best["floor"], "s",
            "import torch, mlflow + open the SQLite store", ("<=", 1.3),
            f"python -c 'import torch, mlflow': {best['imports']:.2f} s"),
        Row("  import torch + seed_everything", best["seed"], best["public"], "s",
            "same, torch.use_deterministic_algorithms", ("<=", 0.75)),
    ], best


def floors(cold: float, loop: dict[str, float], bare: float, measured: dict[str, float]) -> list[Row]:
    """The least the cold repro and the rerun can take while each stage is its own process that opens the store.

    A stage at its floor costs `import torch, mlflow` plus opening the SQLite store (the start-up
    row's baseline), plus the work a bare script does: for train@mlp, the bare script's
    training (its seconds less its own imports). DVC adds a no-op repro's seconds. When a floor
    alone is above a row's target, that row's miss is the cost of one process per stage.
    """
    rerun, noop = loop["rerun"], loop["noop"]
    stage, training = measured["floor"], max(bare - measured["bare_imports"], 0.0)
    rerun_floor = noop + (stage + training) + stage  # train@mlp, then evaluate
    cold_floor = noop + 5 * stage + training  # generate, 3 trainings, evaluate (the linear trainings: ~0 s)
    why = f"{stage:.2f} s per stage process (import torch, mlflow + store), {training:.2f} s bare training, " \
          f"{noop:.2f} s DVC"
    return [
        Row("  floor of the rerun (2 stage processes)", rerun_floor, bare, "s", "bare MLP script", ("<=", 2.2),
            f"the rerun is {rerun / rerun_floor:.2f}x this floor; {why}"),
        Row("  floor of the cold repro (5 stage processes)", cold_floor, None, "s", target=("<=", 24),
            note=f"the cold repro is {cold / cold_floor:.2f}x this floor"),
    ]


def suite() -> Row:
    """The full test suite (the README's command, without the install) in a fresh clone of the committed code."""
    with tempfile.TemporaryDirectory(prefix="bench-suite-") as tmp:
        clone = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        took = timed(clone, PY, "-m", "pytest", "-q", "-p", "no:cacheprovider")
    return Row("full test suite (pytest, fresh clone)", took.seconds / 60, None, "min", target=("<=", 6),
               note=took.stdout.strip().splitlines()[-1])


def scale(work: Path, updates: dict[str, Any], rows: int, features: int) -> list[Row]:
    """generate and train@linear_gd at `rows` x `features`: speed against a bare script, memory against the data."""
    repo = copy_project(work / "scale", {**updates, "data.n_samples": rows, "data.n_features": features})
    raw = rows * (features + 1) * 4  # float32 X and y
    bare = timed(repo, PY, str(ROOT / "bench" / "bare_generate.py"), str(work / "bare.parquet"), str(rows), str(features),
                 peak_rss=True)
    gen = timed(repo, PY, "-m", "stages", "generate", peak_rss=True)
    train = timed(repo, PY, "-m", "stages", "train", "linear_gd", peak_rss=True)
    size = f"{rows:,} rows x {features}"
    mb = 1 << 20
    return [
        Row(f"generate stage, {size}", rows / gen.seconds, rows / bare.seconds, "rows/s", "bare numpy+parquet script",
            (">=", 0.7), f"stage {gen.seconds:.1f} s, bare script {bare.seconds:.1f} s (both whole processes)"),
        Row("  generate peak RSS", gen.peak_rss / mb, raw / mb, "MiB", "raw float32 data", ("<=", 3.0),
            f"bare script peak RSS {bare.peak_rss / mb:.0f} MiB"),
        Row("  train@linear_gd peak RSS", train.peak_rss / mb, raw / mb, "MiB", "raw float32 data", ("<=", 3.0),
            f"stage wall {train.seconds:.1f} s"),
    ]


def workflow_rows(work: Path, updates: dict[str, Any], repeats: int, with_suite: bool) -> list[Row]:
    """The everyday loop: the train stage against a bare script, start-up, the DVC loop, and the test suite.

    All in one throwaway repo; the train stage's rows need the data the cold repro leaves.
    """
    repo = copy_project(work / "loop", updates)
    cold = timed(repo, PY, "-m", "dvc", "repro").seconds
    stage, bare = train_stage(repo, repeats)  # rewrites the same bytes: DVC sees nothing changed
    loop, loop_seconds = user_loop(repo, repeats, cold, bare)
    start, measured = startup(repo, repeats)
    rows = [stage, *loop, *floors(cold, loop_seconds, bare, measured), *start]
    if with_suite:
        rows.append(suite())
    else:
        rows.append(Row("full test suite (pytest, fresh clone)", None, None, "min", note="skipped (--tiny or --no-suite)"))
    return rows
