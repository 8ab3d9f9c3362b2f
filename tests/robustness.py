"""Helpers for the robustness tests (tests/test_robustness_*.py): copies of the baseline, outputs, runs, processes.

The `slow` tests run the real thing: `dvc repro` in a throwaway copy of one reproduced baseline
repository (conftest.py's `baseline`: tiny params, secrets in the environment, a git remote with a
token in its URL), the stage entry points as subprocesses, and a real MLflow SQLite store.
Each test works on its own copy of the baseline, with a fresh MLflow store.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import yaml

from pipeline.files import md5_file

SECRETS = {"API_TOKEN": "tok-5ecret-never-logged", "DB_PASSWORD": "pw-5ecret-never-logged"}
REMOTE_TOKEN = "ghp-5ecret-in-the-remote-url"
N_TRAIN = 420  # train rows under TINY's data.n_samples = 600


def clone(baseline: Path, dest: Path) -> Path:
    """A copy of the baseline (git, DVC cache, outputs) with no MLflow store yet."""
    shutil.copytree(
        baseline, dest, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db", "mlflow.db.lock", "mlartifacts")
    )
    return dest


def outputs(repo: Path) -> dict[str, str]:
    """md5 of every file under every output dvc.lock lists (folders walked); absent files are left out."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    found: dict[str, str] = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            path = repo / out["path"]
            files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else []
            found |= {str(f.relative_to(repo)): md5_file(f) for f in files}
    return found


def stray_temp_files(repo: Path) -> list[Path]:
    """Half-written outputs (atomic_path's temp files) anywhere outside .git and .dvc."""
    return [p for p in repo.rglob(".*.tmp") if not {".git", ".dvc"} & set(p.relative_to(repo).parts)]


def assert_untouched(repo: Path, before: dict[str, str], lock: bytes, changed: tuple[str, ...] = ()) -> None:
    """dvc.lock is byte-identical; every output is either gone (DVC removed it) or has its old bytes."""
    assert (repo / "dvc.lock").read_bytes() == lock, "dvc.lock changed"
    now = outputs(repo)
    new = {k: v for k, v in now.items() if k not in changed and before.get(k) != v}
    assert not new, f"outputs with new content: {sorted(new)}"
    assert not stray_temp_files(repo)


def runs(repo: Path) -> list[Any]:
    """Every run in the repository's MLflow store (none when the store was never created)."""
    db = repo / "mlflow.db"
    if not db.exists():
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def statuses(repo: Path) -> dict[str, list[str]]:
    """{stage tag: [statuses, oldest first]}."""
    out: dict[str, list[str]] = {}
    for run in sorted(runs(repo), key=lambda r: r.info.start_time):
        out.setdefault(run.data.tags.get("stage", "?"), []).append(run.info.status)
    return out


def output_of(proc: subprocess.CompletedProcess[str]) -> str:
    """What a finished command printed, stdout then stderr."""
    return proc.stdout + proc.stderr


def stage_pid(repo: Path, model: str) -> int | None:
    """The pid of `python -m stages train <model>` running in `repo`, if any."""
    wanted = f"stages\0train\0{model}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if wanted in (proc / "cmdline").read_bytes() and (proc / "cwd").resolve() == repo.resolve():
                return int(proc.name)
        except OSError:
            continue
    return None


def running(repo: Path, stage: str) -> bool:
    """Whether `stage` has a RUNNING run, read-only (the poller must not create the store the stage is creating)."""
    db = repo / "mlflow.db"
    if not db.exists():
        return False
    query = "SELECT r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid WHERE t.key = 'stage' AND t.value = ?"
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as con:
            return ("RUNNING",) in con.execute(query, (stage,)).fetchall()
    except sqlite3.OperationalError:  # tables not created yet, or busy
        return False


def wait_for_running(repo: Path, stage: str, proc: subprocess.Popen[str], limit: float = 300) -> None:
    """Poll the store until `stage` has a RUNNING run (the stage is past set-up, into training)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ended early with {proc.returncode}: {proc.communicate()}"
        if running(repo, stage):
            return
        time.sleep(0.5)
    raise AssertionError(f"{stage} never reached a RUNNING MLflow run")
