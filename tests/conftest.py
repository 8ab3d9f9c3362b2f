"""Shared fixtures: tiny configs, and throwaway git+DVC copies of this repository."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import bench.workspace

# One implementation of the throwaway-project helpers, shared with the benchmark; re-exported for the tests.
from bench.workspace import ROOT, TINY, committed_params, set_params, update_params  # noqa: F401
from bench.workspace import env as run_env
from robustness import REMOTE_TOKEN, SECRETS
from tests.processes import free_port, group_alive, stop_group, wait_for_http

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


@dataclass
class Reproduced:
    """A tiny project after one cold `dvc repro`: its path, DVC's output, and the project modules each stage ran."""

    repo: Path
    output: str
    modules: dict[str, set[str]]
    stderr: str
    compiler: dict[str, set[str]]  # the torch._dynamo, torch._inductor, torch.export modules each stage loaded


def _stage_name(argv: list[str]) -> str:
    """`python -m stages.train mlp` -> 'train@mlp', as dvc.yaml's foreach names it."""
    module = Path(argv[0]).stem
    return f"{module}@{argv[1]}" if module == "train" else module


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> Reproduced:
    """One cold `dvc repro` shared by the tests that read it (the e2e tests, the stage-deps tests).

    tests/import_probe is a sitecustomize on PYTHONPATH: every stage's process records,
    at exit, which modules under pipeline/ and stages/ it loaded, and which torch compiler modules.
    """
    repo = copy_project(tmp_path_factory.mktemp("e2e") / "repo")
    out = tmp_path_factory.mktemp("imports")
    proc = dvc(repo, "repro", env=run_env(PYTHONPATH=str(ROOT / "tests" / "import_probe"), STAGE_IMPORTS_DIR=str(out)))
    modules: dict[str, set[str]] = {}
    compiler: dict[str, set[str]] = {}
    for record in map(json.loads, (p.read_text() for p in out.glob("*.json"))):
        modules.setdefault(_stage_name(record["argv"]), set()).update(record["modules"])
        compiler.setdefault(_stage_name(record["argv"]), set()).update(record["compiler"])
    return Reproduced(repo, proc.stdout + proc.stderr, modules, proc.stderr, compiler)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A throwaway git+DVC copy of this repository with tiny params."""
    return copy_project(tmp_path / "repo")


@pytest.fixture(scope="session")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reproduced tiny project, committed; secrets were in the environment of every stage.

    Built once per session; tests copy it (robustness.clone) or only read it.
    """
    repo = copy_project(tmp_path_factory.mktemp("baseline") / "repo")
    sh(repo, "git", "remote", "add", "origin", f"https://ci:{REMOTE_TOKEN}@example.invalid/team/pipeline.git")
    dvc(repo, "repro", env=run_env(**SECRETS))
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline run")
    return repo


@pytest.fixture
def spawn() -> Iterator[Any]:
    """Start background commands in their own process group; whatever is left is killed after the test."""
    started: list[subprocess.Popen[str]] = []

    def start(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or run_env(), text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the group: a killed `dvc` would orphan its stage
            proc.communicate()


def requires_cuda(test: Any) -> Any:
    """Mark a test `gpu` (scripts/gpu-check.sh runs those) and skip it where CUDA is absent."""
    skip = pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA device")
    return pytest.mark.gpu(skip(test))


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


SERVER_SCRIPT = ROOT / "scripts" / "mlflow-server.sh"


@dataclass
class Server:
    """A running `scripts/mlflow-server.sh` and where it keeps its data."""

    url: str
    folder: Path
    auth: tuple[str, str] | None = None

    def request(self, path: str, body: dict[str, Any] | None = None, auth: tuple[str, str] | None = None) -> bytes:
        """GET (or POST a JSON body) against the server; return the raw response body."""
        req = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode() if body is not None else None)
        req.add_header("Content-Type", "application/json")
        if creds := auth or self.auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(":".join(creds).encode()).decode())
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read()

    def api(self, endpoint: str, body: dict[str, Any] | None = None, **query: str) -> dict[str, Any]:
        """Call the REST API (/api/2.0/mlflow/...) and decode its JSON answer."""
        qs = f"?{urllib.parse.urlencode(query)}" if query else ""
        return json.loads(self.request(f"/api/2.0/mlflow/{endpoint}{qs}", body))


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Any]:
    """Start scripts/mlflow-server.sh on a free local port; stop its process group afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str, **env: str) -> Server:
        folder = tmp_path / f"server{len(started)}"
        url = f"http://127.0.0.1:{free_port()}"
        log = tmp_path / f"server{len(started)}.log"
        with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                [str(SERVER_SCRIPT), *args],
                env=run_env(SERVER_DIR=str(folder), PORT=url.rsplit(":", 1)[1], WORKERS="1",
                            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **env),
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        started.append(proc)
        wait_for_http(proc, f"{url}/health", log)  # up to two minutes on a busy machine
        return Server(url, folder)

    yield start
    for proc in started:
        stop_group(proc)
        assert not group_alive(proc.pid), f"processes of group {proc.pid} outlived the server"
