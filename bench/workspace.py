"""Throwaway copies of this project, and commands timed with their peak memory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict[str, str]:
    """The environment for timed commands: this venv first, a git identity, no outside MLflow/DVC state."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    out.update(
        GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.invalid",
        GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@example.invalid",
        DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1",
    )
    return out


def set_params(repo: Path, updates: dict[str, Any]) -> None:
    """Apply dotted-key updates ({'mlp.lr': 0.1}) to repo/params.yaml."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in updates.items():
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@dataclass
class Timed:
    """A finished command: wall seconds, peak resident memory of the process in bytes, output."""

    seconds: float
    peak_rss: int
    stdout: str


def timed(repo: Path, *cmd: str) -> Timed:
    """Run a command to completion in `repo`; fail loudly with its output if it fails."""
    with tempfile.TemporaryFile("w+") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=repo, env=env(), stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode} in {repo}:\n{text[-4000:]}")
    return Timed(seconds, usage.ru_maxrss * 1024, text)


def copy_project(dest: Path, updates: dict[str, Any]) -> Path:
    """This project's source (tracked and new files, no outputs) as a fresh git repo at `dest`."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    for rel in filter(None, listing.split("\0")):
        src = ROOT / rel
        if src.is_file() and rel != "dvc.lock" and not rel.startswith(("tests/", "bench/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    set_params(dest, updates)
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench baseline"]):
        subprocess.run(cmd, cwd=dest, env=env(), check=True, capture_output=True)
    return dest
