"""Figures measured on whole stages and DVC commands, in throwaway git+DVC copies of the project."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from bench.report import Row
from bench.workspace import ROOT, copy_project, env, set_params, timed
from pipeline import warm

PY = sys.executable


COLD = {"PIPELINE_WARM": "0"}  # a stage process of its own: what every stage paid before the warm server
Command = tuple[tuple[str, ...], dict[str, str]]  # a command and the variables it runs with


def _best(repeats: int, repo: Path, commands: dict[str, Command]) -> dict[str, float]:
    """Shortest wall time of each command over `repeats` interleaved runs."""
    best = {name: float("inf") for name in commands}
    for _ in range(repeats):
        for name, (cmd, extra) in commands.items():
            best[name] = min(best[name], timed(repo, *cmd, extra=extra).seconds)
    return best


@contextmanager
def warm_server(folder: Path) -> Iterator[float]:
    """A warm stage server of the benchmark's own (PIPELINE_WARM_DIR: every timed command finds it); its start, s."""
    folder.mkdir(mode=0o700)
    before = os.environ.get("PIPELINE_WARM_DIR")
    os.environ["PIPELINE_WARM_DIR"] = str(folder)
    try:
        start = time.perf_counter()
        warm.start(env())  # the environment the timed commands get
        yield time.perf_counter() - start
    finally:
        warm.stop()
        if before is None:
            del os.environ["PIPELINE_WARM_DIR"]
        else:
            os.environ["PIPELINE_WARM_DIR"] = before


def user_loop(repo: Path, repeats: int, bare_mlp: float) -> list[Row]:
    """The rerun after mlp.lr changes (against the bare MLP script), a no-op repro, and a DVC command through the warm
    server (against the same in a process of its own)."""
    lr = yaml.safe_load((repo / "params.yaml").read_text())["mlp"]["lr"]
    set_params(repo, {"mlp.lr": lr / 2})
    rerun = timed(repo, PY, "-m", "dvc", "repro")
    ran = re.findall(r"Running stage '([^']+)'", rerun.stdout)
    worked = [stage for stage in ran if stage != "params"]  # `params` checks the edited file (0.2 s) and stops
    show = ("exp", "show", "--json")
    best = _best(repeats, repo, {"repro": ((PY, "-m", "dvc", "repro"), {}), "status": ((PY, "-m", "dvc", "status"), {}),
                                 "show": ((PY, "-m", "dvc", *show), {}),
                                 "warm show": ((PY, "-m", "pipeline.warm", "run", "dvc", *show), {})})
    return [
        Row("dvc repro after mlp.lr changed", rerun.seconds, bare_mlp, "s", "bare MLP script", ("<=", 1.3)),
        Row("  stages rerun after mlp.lr changed", len(worked), None, "stages", target=("==", 2),
            note=", ".join(worked) + (" (and the params check)" if "params" in ran else "")),
        Row("no-op dvc repro", best["repro"], best["status"], "s", "dvc status", ("<=", 1.3)),
        Row("dvc exp show --json, warm", best["warm show"], best["show"], "s", "the same, a process of its own",
            ("<=", 0.8), note="a search's look at its trials: python -m pipeline.warm run dvc exp show --json"),
    ]


def _cold_note(best: dict[str, float], baseline: str) -> str:
    """The same command in a process of its own (COLD), against `baseline`; not timed with --tiny (no "cold" run)."""
    if "cold" not in best:
        return "cold: not timed (--tiny)"
    return f"cold (a process of its own) {best['cold']:.2f} s, {best['cold'] / best[baseline]:.2f}x"


def train_stage(repo: Path, repeats: int, cold: bool = True) -> tuple[Row, float]:
    """`python -m stages train mlp` (the whole stage, tracked; warm) against a bare script doing the same training.

    The bare script (bench/bare_train.py) reads the Parquet splits, runs an eager loop for as
    many epochs as the stage ran (early stopping included), and saves the weights. Returns the
    row (the cold stage in its note, unless not `cold`) and the bare script's seconds (the baseline of the rerun row
    too).
    """
    timed(repo, PY, "-m", "stages", "train", "mlp")  # warm the store and the file cache; learn the epochs run
    epochs = json.loads((repo / "metrics" / "train" / "mlp.json").read_text())["steps_run"]
    stage = (PY, "-m", "stages", "train", "mlp")
    best = _best(repeats, repo, {
        "warm": (stage, {}), **({"cold": (stage, COLD)} if cold else {}),
        "bare": ((PY, str(ROOT / "bench" / "bare_train.py"), str(epochs), str(repo / "bare.safetensors")), {}),
    })
    row = Row("train@mlp stage, warm", best["warm"], best["bare"], "s", "bare script (read, eager loop, save)",
              ("<=", 1.0), f"{epochs} epochs in both; {_cold_note(best, 'bare')}")
    return row, best["bare"]


def startup(repo: Path, repeats: int, cold: bool = True) -> Row:
    """A stage's fixed cost (train@linear_gd with one step), warm, against importing torch and mlflow and opening the
    store; the same stage cold in the note, unless not `cold`."""
    set_params(repo, {"linear_gd.steps": 1})
    store = f"sqlite:///{repo / 'mlflow.db'}"
    floor = f"import torch, mlflow; from mlflow.tracking import MlflowClient; MlflowClient({store!r}).search_experiments()"
    stage = (PY, "-m", "stages", "train", "linear_gd")
    best = _best(repeats, repo, {"warm": (stage, {}), **({"cold": (stage, COLD)} if cold else {}),
                                 "floor": ((PY, "-c", floor), {})})
    return Row("warm stage start-up (1-step train@linear_gd)", best["warm"], best["floor"], "s",
               "import torch, mlflow + open the SQLite store", ("<=", 0.3), _cold_note(best, "floor"))


WIDE = {"mlp.hidden": [128, 128]}  # a choice of the committed search space; more work per step than the default


def queue_row(repo: Path) -> Row:
    """Two queued `[128,128]` experiments run two at a time, against one such experiment alone (warm server).

    `repo` is reproduced at WIDE: each experiment reruns train@mlp and evaluate.
    """
    lr = yaml.safe_load((repo / "params.yaml").read_text())["mlp"]["lr"]

    def run_queued(*values: float) -> float:
        for value in values:
            timed(repo, PY, "-m", "dvc", "exp", "run", "--queue", "-S", f"mlp.lr={value}")
        return timed(repo, PY, "-m", "dvc", "exp", "run", "--run-all", "-j", str(len(values))).seconds

    one = run_queued(lr * 0.9)
    two = run_queued(lr * 0.8, lr * 0.7)
    return Row("2 queued [128,128] experiments, -j 2", two, one, "s", "one such experiment alone", ("<=", 1.5))


def sharing_rows(repos: list[Path], repeats: int) -> list[Row]:
    """The same `[128,128]` train@mlp stage alone, two at once (two workspaces reproduced at WIDE), and beside a
    busy process (warm)."""
    stage = (PY, "-m", "stages", "train", "mlp")
    alone = _best(repeats, repos[0], {"alone": (stage, {})})["alone"]
    together = []
    for _ in range(repeats):
        with ThreadPoolExecutor(2) as pool:
            together.append(max(pool.map(lambda repo: timed(repo, *stage).seconds, repos)))
    busy = subprocess.Popen([PY, "-c", "while True: pass"])
    try:
        beside = _best(repeats, repos[0], {"busy": (stage, {})})["busy"]
    finally:
        busy.kill()
        busy.wait()
    return [
        Row("[128,128] train@mlp, two at once", min(together), alone, "s", "the same stage alone", ("<=", 1.5),
            "the slower of the two; each trains on its share of the cores (pipeline/cores.py)"),
        Row("[128,128] train@mlp, beside a busy process", beside, alone, "s", "the same stage alone",
            note="one other process spinning on a core"),
    ]


def suite() -> Row:
    """The full test suite (the README's command, without the install) in a fresh clone of the committed code."""
    with tempfile.TemporaryDirectory(prefix="bench-suite-") as tmp:
        clone = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        took = timed(clone, PY, "-m", "pytest", "-q", "-p", "no:cacheprovider")
    return Row("full test suite (pytest, fresh clone)", took.seconds / 60, None, "min", target=("<=", 10),
               note=took.stdout.strip().splitlines()[-1])


def scale(work: Path, updates: dict[str, Any], rows: int, features: int) -> list[Row]:
    """generate and train@linear_gd at `rows` x `features`: speed against a bare script, memory against the data."""
    repo = copy_project(work / "scale", {**updates, "data.n_samples": rows, "data.n_features": features})
    raw = rows * (features + 1) * 4  # float32 X and y
    bare = timed(repo, PY, str(ROOT / "bench" / "bare_generate.py"), str(work / "bare.parquet"), str(rows), str(features),
                 peak_rss=True)
    gen = timed(repo, PY, "-m", "stages", "generate", peak_rss=True, extra=COLD)  # the memory of the stage's own process
    train = timed(repo, PY, "-m", "stages", "train", "linear_gd", peak_rss=True, extra=COLD)
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


def workflow_rows(work: Path, updates: dict[str, Any], repeats: int, with_suite: bool, tiny: bool = False) -> list[Row]:
    """The everyday loop: cold and first repros, the train stage against a bare script, start-up, the DVC loop,
    queued experiments and stages sharing the cores, and the test suite; each in throwaway repos.

    `tiny`: the sharing and queue rows reuse the two repos already reproduced (tiny MLPs) instead of
    reproducing two at WIDE, and no stage is timed cold beside its warm figure (about 12 s): they check that the
    code runs, as every --tiny figure does.
    """
    cold = None if tiny else timed(copy_project(work / "cold", updates), PY, "-m", "dvc", "repro", extra=COLD).seconds
    first_repo = copy_project(work / "first", updates)
    with warm_server(work / "warm") as server_start:
        first = timed(first_repo, PY, "-m", "dvc", "repro").seconds
        repo = copy_project(work / "loop", updates)
        warm_repro = timed(repo, PY, "-m", "dvc", "repro").seconds
        stage, bare = train_stage(repo, repeats, cold=not tiny)  # rewrites the same bytes: DVC sees nothing changed
        rows = [
            Row("cold dvc repro (5 stages), warm server", warm_repro, None, "s", target=("<=", 15),
                note=f"without a server (PIPELINE_WARM=0): {cold:.1f} s" if cold else "not timed without a server: --tiny"),
            Row("first ./tasks.sh repro (server start + repro)", server_start + first, None, "s", target=("<=", 24),
                note=f"server start {server_start:.1f} s, dvc repro {first:.1f} s"),
            stage, *user_loop(repo, repeats, bare), startup(repo, repeats, cold=not tiny),
        ]
        wide = [repo, first_repo] if tiny else [copy_project(work / f"wide{i}", {**updates, **WIDE}) for i in range(2)]
        for each in [] if tiny else wide:
            timed(each, PY, "-m", "dvc", "repro")
        rows += sharing_rows(wide, repeats)
        rows.append(Row("2 queued [128,128] experiments, -j 2", None, None, "s", note="skipped (--tiny): 30 s of DVC's "
                        "queue per experiment here; tests/test_experiments.py runs queued experiments") if tiny
                    else queue_row(wide[0]))
    if with_suite:
        rows.append(suite())
    else:
        rows.append(Row("full test suite (pytest, fresh clone)", None, None, "min", note="skipped (--tiny or --no-suite)"))
    return rows
