"""Shared fixtures: tiny configs, and throwaway git+DVC copies of this repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Small enough that a whole `dvc repro` is dominated by process start-up.
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
}


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


def tiny_params() -> dict[str, Any]:
    """The repository's params.yaml with TINY applied, as a dict."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in TINY.items():
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[leaf] = value
    return params


def run_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: this venv first on PATH, a git identity, no outside store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.invalid",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.invalid",
        DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def sh(repo: Path, *cmd: str, check: bool = True, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a command in `repo`, capturing output; on failure show it."""
    proc = subprocess.run(cmd, cwd=repo, env=env or run_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def dvc(repo: Path, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run the real DVC CLI of this environment."""
    return sh(repo, sys.executable, "-m", "dvc", *args, **kwargs)


def copy_project(dest: Path, updates: dict[str, Any] | None = None) -> Path:
    """Copy the tracked project files into a fresh git repo at `dest`, params shrunk to TINY."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        src = ROOT / rel
        if src.is_file() and not rel.startswith("dvc.lock"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    set_params(dest, {**TINY, **(updates or {})})
    sh(dest, "git", "init", "-q", "-b", "main")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "test baseline")
    return dest


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A throwaway git+DVC copy of this repository with tiny params."""
    return copy_project(tmp_path / "repo")


requires_cuda = pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA device")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bad_input: a bad-input case (params, data, store); counted in the summary")


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Print how many bad-input cases ran (a test covering several sets user property bad_input_cases)."""
    reports = [
        r for outcome in ("passed", "failed") for r in terminalreporter.stats.get(outcome, [])
        if r.when == "call" and "bad_input" in r.keywords
    ]
    if reports:
        cases = [dict(r.user_properties).get("bad_input_cases", 1) for r in reports]
        passed = sum(n for n, r in zip(cases, reports) if r.passed)
        terminalreporter.write_line(f"bad-input cases covered: {sum(cases)} ({passed} passed)")
