"""What a stage pays around its work, phase by phase, measured in the real stage process.

Run: python -m bench.phases [--tiny]. In a throwaway copy of the project at the committed
defaults (tiny params with --tiny), after one `dvc repro`, each stage runs again under
cProfile and `-X importtime`; the table gives each phase's seconds (cumulative time of the
functions that make it up, best of the repeats) and the heaviest imports, so every fixed
cost can be set against its floor (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import pstats
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.workspace import TINY, copy_project, env, timed

STAGES = (("generate",), ("train", "linear_gd"), ("train", "mlp"), ("evaluate",))
# phase -> the project functions (module file, function name) whose cumulative time it is
PHASES: dict[str, tuple[tuple[str, str], ...]] = {
    "config (params.yaml)": (("pipeline/config.py", "load"),),
    "pre-flight (store checked)": (("pipeline/tracking/store.py", "preflight"),),
    "store opened, experiment": (("pipeline/tracking/store.py", "connect"),),
    "stale-run check": (("pipeline/tracking/run.py", "close_orphaned_runs"),),
    "provenance tags (git)": (("pipeline/tracking/provenance.py", "context_tags"),),
    "run started (MLflow)": (("mlflow/tracking/fluent.py", "start_run"),),
    "data read": (("pipeline/data.py", "read_truth"), ("pipeline/data.py", "read_checked_split"),
                  ("stages/paths.py", "verified_split_digests")),
    "generate (draw, write Parquet)": (("pipeline/data.py", "generate"),),
    "training": (("pipeline/training.py", "fit"), ("pipeline/training.py", "gradient_descent")),
    "scoring": (("pipeline/models.py", "load_weights"), ("pipeline/evaluation.py", "references"),
                ("pipeline/models.py", "predict"), ("pipeline/evaluation.py", "score")),
    "outputs (weights, CSV, JSON)": (("pipeline/models.py", "save_weights"), ("pipeline/files.py", "write_csv"),
                                     ("pipeline/files.py", "write_metrics"), ("pipeline/files.py", "write_json")),
    "PNG pictures": (("pipeline/plots.py", "loss_curves"), ("pipeline/plots.py", "predicted_vs_actual")),
    "params logged": (("pipeline/tracking/run.py", "log_params"),),
    "tags logged": (("pipeline/tracking/run.py", "set_tags"),),
    "metrics logged (flush)": (("pipeline/tracking/run.py", "flush"),),
    "datasets logged": (("pipeline/tracking/run.py", "log_dataset"),),
    "artifacts logged": (("pipeline/tracking/run.py", "log_artifact"), ("pipeline/tracking/run.py", "log_dict")),
    "lineage (generate link, scores copied)": (("pipeline/tracking/run.py", "link_generate_run"),
                                               ("pipeline/tracking/run.py", "score_training_run")),
    "model logged": (("pipeline/tracking/run.py", "log_torch_model"),),
    "registry": (("pipeline/tracking/run.py", "register_model"),),
    "run ended": (("mlflow/tracking/fluent.py", "end_run"),),
}
IMPORT_WATCH = ("torch", "mlflow", "pandas", "matplotlib", "pyarrow", "sqlalchemy", "alembic", "git", "torch._dynamo",
                "torch._inductor", "torch.export")


def _phase_seconds(profile: Path) -> dict[str, float]:
    """Cumulative seconds per phase from a cProfile dump (a function called inside another phase counts once)."""
    stats = pstats.Stats(str(profile)).stats  # type: ignore[attr-defined]
    out = {}
    for phase, functions in PHASES.items():
        out[phase] = sum(
            ct for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.items()
            if any(file.endswith(f) and func == name for f, name in functions)
        )
    return out


def _imports(stderr: str) -> dict[str, float]:
    """Seconds of the watched top-level imports (cumulative, first import only) from `-X importtime`."""
    found: dict[str, float] = {}
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)$", line)
        if m and m.group(3) in IMPORT_WATCH and m.group(3) not in found:
            found[m.group(3)] = int(m.group(1)) / 1e6
    return found


def measure(repo: Path, stage: tuple[str, ...], repeats: int) -> tuple[float, dict[str, float], dict[str, float]]:
    """(wall seconds, seconds per phase, seconds per watched import) of one stage: best of `repeats`."""
    best_wall, phases, imports = float("inf"), {}, {}
    with tempfile.TemporaryDirectory(prefix="phases-") as tmp:
        prof = Path(tmp) / "stage.prof"
        for _ in range(repeats):
            start = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-X", "importtime", "-m", "cProfile", "-o", str(prof), "-m", "stages", *stage],
                cwd=repo, env=env(PIPELINE_WARM="0"), capture_output=True, text=True,  # profiled in its own process
            )
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(f"stage {' '.join(stage)} failed:\n{proc.stderr[-3000:]}")
            if wall < best_wall:
                best_wall, phases, imports = wall, _phase_seconds(prof), _imports(proc.stderr)
    return best_wall, phases, imports


def main(argv: list[str]) -> None:
    """Reproduce a throwaway copy once, then print each stage's phases and heavy imports."""
    parser = argparse.ArgumentParser(prog="python -m bench.phases", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny params (checks that it runs)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="phases-") as tmp:
        repo = copy_project(Path(tmp) / "repo", TINY if args.tiny else {})
        timed(repo, sys.executable, "-m", "dvc", "repro")
        for stage in STAGES:
            wall, phases, imports = measure(repo, stage, args.repeats)
            label = "@".join(stage)
            print(f"\n{label}: {wall:.2f} s wall (profiled), best of {args.repeats}")
            for phase, seconds in phases.items():
                if seconds >= 0.0005:
                    print(f"  {seconds:7.3f} s  {phase}")
            print("  imports: " + ", ".join(f"{name} {s:.2f} s" for name, s in imports.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
