"""Throwaway copies of this project, and commands timed with their peak memory."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline import config

ROOT = Path(__file__).resolve().parents[1]

# Small enough that a whole `dvc repro` is dominated by process start-up: the tests' params,
# `python -m bench --tiny` and bench/fail_fast.py.
TINY: dict[str, Any] = {
    "data.n_samples": 600,
    "linear_gd.steps": 30,
    "linear.epochs": 2,
    "linear.batch_size": 64,
    "mlp.hidden": [8],
    "mlp.epochs": 3,
    "mlp.batch_size": 64,
    "mlp.patience": 2,
    "evaluate.plot_points": 50,
    "mlflow.wait_seconds": 0,  # a tracking server that is down fails at once (tests of the wait set their own)
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    """Environment for project commands: this venv first, a git identity, no outside MLflow/DVC state.

    PYTEST_CURRENT_TEST is left out too: MLflow turns on checks of its own test suite when it
    sees it, and the commands must run as they do in a user's shell.
    """
    out = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_")) and k != "PYTEST_CURRENT_TEST"}
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    out.update(
        GIT_AUTHOR_NAME="dev", GIT_AUTHOR_EMAIL="dev@example.invalid",
        GIT_COMMITTER_NAME="dev", GIT_COMMITTER_EMAIL="dev@example.invalid",
        DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1",
    )
    out.update(extra)
    return out


def update_params(params: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """Apply dotted-key updates ({'mlp.lr': 0.1}) to a params mapping, in place; return it."""
    for dotted, value in updates.items():
        config.set_dotted(params, dotted, value)
    return params


def set_params(repo: Path, updates: dict[str, Any]) -> None:
    """Apply dotted-key updates to repo/params.yaml."""
    path = repo / "params.yaml"
    path.write_text(yaml.safe_dump(update_params(yaml.safe_load(path.read_text()), updates), sort_keys=False))


@dataclass
class Timed:
    """A finished command: wall seconds, peak resident memory of the process in bytes (0 if not asked), output."""

    seconds: float
    peak_rss: int
    stdout: str


def timed(repo: Path, *cmd: str, peak_rss: bool = False, extra: dict[str, str] | None = None) -> Timed:
    """Run a command to completion in `repo` (its environment: env(**extra)); fail loudly with its output if it fails.

    With `peak_rss`, the command runs under bench/peak.py, which reports its own
    child's wall time and peak memory (so the benchmark's memory does not leak in).
    """
    with tempfile.TemporaryDirectory(prefix="bench-cmd-") as tmp:
        result = Path(tmp) / "peak.json"
        full = (sys.executable, str(ROOT / "bench" / "peak.py"), str(result), *cmd) if peak_rss else cmd
        start = time.perf_counter()
        proc = subprocess.run(full, cwd=repo, env=env(**(extra or {})), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode} in {repo}:\n{proc.stdout[-4000:]}")
        if not peak_rss:
            return Timed(seconds, 0, proc.stdout)
        measured = json.loads(result.read_text())
        return Timed(measured["seconds"], measured["peak_rss"], proc.stdout)


def committed_params(root: Path = ROOT) -> str:
    """params.yaml as committed at HEAD: the defaults tests and benchmarks build from, whatever the workspace holds."""
    proc = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cannot read the committed params.yaml in {root} ({proc.stderr.strip()}); commit it first")
    return proc.stdout


def copy_project(
    dest: Path, updates: dict[str, Any], root: Path = ROOT, skip: tuple[str, ...] = ("tests/", "bench/"),
) -> Path:
    """This project's source (tracked and new files, no outputs) as a fresh git repo at `dest`.

    params.yaml is the committed one (plus `updates`), never the workspace's edits: a user's
    experiment in progress must not change what a test or a benchmark measures.
    """
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout
    for rel in filter(None, listing.split("\0")):
        src = root / rel
        if src.is_file() and rel not in ("dvc.lock", "params.yaml") and not rel.startswith(skip):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "params.yaml").write_text(committed_params(root))
    if updates:
        set_params(dest, updates)
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "baseline"]):
        subprocess.run(cmd, cwd=dest, env=env(), check=True, capture_output=True)
    return dest
