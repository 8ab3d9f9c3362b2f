"""Shared fixtures: tiny configs, and throwaway git+DVC copies of this repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import bench.workspace

# One implementation of the throwaway-project helpers, shared with the benchmark; re-exported for the tests.
from bench.workspace import ROOT, committed_params, set_params, update_params  # noqa: F401
from bench.workspace import env as run_env

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


def tiny_params() -> dict[str, Any]:
    """The committed params.yaml (not the workspace's edits) with TINY applied, as a dict."""
    return update_params(yaml.safe_load(committed_params()), TINY)


@pytest.fixture(scope="session")
def defaults_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed params.yaml, as a file outside the workspace: what tests of the defaults load."""
    path = tmp_path_factory.mktemp("defaults") / "params.yaml"
    path.write_text(committed_params())
    return path


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
    """The project's source as a fresh git repo at `dest`, params shrunk to TINY (plus `updates`)."""
    return bench.workspace.copy_project(dest, {**TINY, **(updates or {})})


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
