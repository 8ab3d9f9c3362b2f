"""Figures measured on whole stages and DVC commands, in throwaway git+DVC copies of the project."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

from bench.report import Row
from bench.workspace import ROOT, copy_project, set_params, timed

# The train stage's training without the stage around it: read the splits, train, save the weights.
UNTRACKED_TRAIN = """
import sys
from pipeline import config, data, device, models
from stages import distributed, paths, train

cfg, name = config.load(), sys.argv[1]
where = device.prepare(cfg.device, cfg.seed)
splits = train.read_splits(data.read_truth(paths.TRUTH), where)
result, spec = train.fit(cfg, name, splits, distributed.Group(where), progress=False)
models.save_weights(result.model, spec, paths.weights_path(name))
"""

PY = sys.executable


def _best(repeats: int, repo: Path, commands: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """Shortest wall time of each command over `repeats` interleaved runs."""
    best = {name: float("inf") for name in commands}
    for _ in range(repeats):
        for name, cmd in commands.items():
            best[name] = min(best[name], timed(repo, *cmd).seconds)
    return best


def user_loop(repo: Path, repeats: int) -> list[Row]:
    """Cold `dvc repro`, the rerun after one mlp param changes, and a no-op repro against `dvc status`."""
    cold = timed(repo, PY, "-m", "dvc", "repro")
    lr = yaml.safe_load((repo / "params.yaml").read_text())["mlp"]["lr"]
    set_params(repo, {"mlp.lr": lr / 2})
    rerun = timed(repo, PY, "-m", "dvc", "repro")
    ran = re.findall(r"Running stage '([^']+)'", rerun.stdout)
    best = _best(repeats, repo, {
        "repro": (PY, "-m", "dvc", "repro"),
        "status": (PY, "-m", "dvc", "status"),
    })
    return [
        Row("cold dvc repro (5 stages)", cold.seconds, None, "s", target=("<=", 22)),
        Row("dvc repro after mlp.lr changed", rerun.seconds, None, "s", target=("<=", 8),
            note=f"{rerun.seconds / cold.seconds:.2f}x the cold repro"),
        Row("  stages rerun after mlp.lr changed", len(ran), None, "stages", target=("==", 2), note=", ".join(ran)),
        Row("no-op dvc repro", best["repro"], best["status"], "s", "dvc status", ("<=", 1.3)),
    ]


def tracking_overhead(repo: Path, repeats: int) -> list[Row]:
    """Wall time of `python -m stages.train mlp` against the same training and outputs without MLflow."""
    best = _best(repeats, repo, {
        "on": (PY, "-m", "stages", "train", "mlp"),
        "off": (PY, "-c", UNTRACKED_TRAIN, "mlp"),
    })
    return [Row("train@mlp stage, tracking on", best["on"], best["off"], "s", "tracking off", ("<=", 1.2))]


def startup(repo: Path, repeats: int) -> list[Row]:
    """A stage's fixed cost (train@linear_gd with one step) against importing torch and mlflow."""
    set_params(repo, {"linear_gd.steps": 1})
    best = _best(repeats, repo, {
        "stage": (PY, "-m", "stages", "train", "linear_gd"),
        "imports": (PY, "-c", "import torch, mlflow"),
        "seed": (PY, "-c", "import torch; from pipeline.device import seed_everything; seed_everything(0)"),
        "torch": (PY, "-c", "import torch"),
        "public": (PY, "-c", "import torch; torch.use_deterministic_algorithms(True, warn_only=True)"),
    })
    return [
        Row("stage start-up (1-step train@linear_gd)", best["stage"], best["imports"], "s",
            "python -c 'import torch, mlflow'", ("<=", 1.3)),
        Row("  import torch + seed_everything", best["seed"], best["public"], "s",
            "same, torch.use_deterministic_algorithms", ("<=", 0.75), f"python -c 'import torch': {best['torch']:.2f} s"),
    ]


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


def workflow_rows(work: Path, updates: dict[str, Any], repeats: int) -> list[Row]:
    """User loop, tracking overhead and start-up, in one throwaway repo (the loop leaves data to reuse)."""
    repo = copy_project(work / "loop", updates)
    rows = user_loop(repo, repeats)
    rows += tracking_overhead(repo, repeats)
    rows += startup(repo, repeats)
    return rows
