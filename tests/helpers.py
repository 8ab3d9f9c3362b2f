"""Every helper the tests share, in one module: throwaway projects, commands, processes and servers, outputs and runs.

Tests import from here (`from tests.helpers import ...`); tests/conftest.py holds only fixtures and hooks.
The slow tests run the real thing: `dvc repro` in a throwaway git+DVC copy of this repository, the
stage entry points as subprocesses, a real MLflow SQLite store or `mlflow server`.
"""

from __future__ import annotations

import base64
import fcntl
import functools
import http.client
import json
import os
import pwd
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

import bench.workspace

# One implementation of the throwaway-project helpers, shared with the benchmark; re-exported for the tests.
from bench.workspace import ROOT, TINY, committed_params, free_port, set_params, update_params  # noqa: F401
from bench.workspace import env as run_env
from pipeline import warm
from pipeline.files import md5_file


def tiny_params() -> dict[str, Any]:
    """The committed params.yaml (not the workspace's edits) with TINY applied, as a dict."""
    return update_params(yaml.safe_load(committed_params()), TINY)


def split_files(folder: Path) -> dict[str, Path]:
    """{split: folder/<split>.parquet}: where a test has data.generate write each split (the folder made)."""
    from pipeline.data import SPLITS

    folder.mkdir(parents=True, exist_ok=True)
    return {split: folder / f"{split}.parquet" for split in SPLITS}
@functools.cache
def model_names() -> tuple[str, ...]:
    """The models the committed params.yaml lists: what a test iterates, or picks one from, instead of naming one."""
    return tuple(yaml.safe_load(committed_params())["models"])


def pipeline_stages() -> list[str]:
    """Every stage of the committed pipeline that opens an MLflow run, in the order `dvc repro` runs them."""
    return ["generate", *(f"train@{m}" for m in model_names()), "evaluate"]


def sh(repo: Path, *cmd: str, check: bool = True, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a command in `repo`, capturing output; on failure show it."""
    proc = subprocess.run(cmd, cwd=repo, env=env or run_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


DVC = [sys.executable, "-m", "pipeline.warm", "run", "dvc"]  # `python -m dvc`, warm where a server runs
SUITE_WARM = os.environ.get("PIPELINE_WARM")  # the suite's own choice, before a test's stage_start changes it


def suite_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default run_env()) with the suite's warm setting: for a test whose stages start cold (stage_start),
    the commands around the one it tests (a sync, the repro after an interruption) start as the suite's do; a cold
    process costs 4-5 s of CPU, and warm and cold give the same results (tests/test_warm.py)."""
    out = {k: v for k, v in (env or run_env()).items() if k != "PIPELINE_WARM"}
    return out if SUITE_WARM is None else {**out, "PIPELINE_WARM": SUITE_WARM}


def dvc(repo: Path, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run the real DVC CLI of this environment, in a warm server's child where one runs (as the search does)."""
    return sh(repo, *DVC, *args, **kwargs)


def copy_project(dest: Path, updates: dict[str, Any] | None = None) -> Path:
    """The project's source as a fresh git repo at `dest`, params shrunk to TINY (plus `updates`)."""
    return bench.workspace.copy_project(dest, {**TINY, **(updates or {})})


@dataclass
class Reproduced:
    """A tiny project after one `dvc repro`: its path, and what DVC printed (all of it, and stderr alone)."""

    repo: Path
    output: str
    stderr: str


@dataclass
class ColdRepro:
    """A tiny project reproduced with each stage a process of its own: what each stage's process imported, and what
    the repro left, read when it finished (the project's folder is shared: copy it before changing anything)."""

    repo: Path
    stdout: str
    stderr: str
    outputs: dict[str, str]  # helpers.outputs
    lock: str  # dvc.lock
    git_status: str  # `git status --porcelain`
    store: dict[str, Any]  # helpers.store_content of its experiment, through JSON (tuples as lists)
    modules: dict[str, set[str]]  # the project's modules (pipeline/, stages/), by stage
    compiler: dict[str, set[str]]  # the torch._dynamo, torch._inductor, torch.export modules each stage loaded


DURATIONS = ROOT / "tests" / "durations.json"  # seconds per test, from a whole run with --record-durations


def known_durations() -> dict[str, float]:
    """Each test's seconds in the last recorded run ({} when there is none)."""
    try:
        return dict(json.loads(DURATIONS.read_text()))
    except (OSError, ValueError):
        return {}


def built_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Any]) -> tuple[Path, Any]:
    """A folder that `build` fills, and what it returned (JSON): built once for all the xdist workers of this run.

    The first worker builds it in the run's temp folder the workers share, under a file lock; the others wait for
    it, then read it (copy it before changing anything). Without xdist: built in this session's temp folder.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = factory.mktemp(name)
        return folder, build(folder)
    shared = factory.getbasetemp().parent  # pytest-N: this run's, above each worker's popen-gwK
    folder, said = shared / name, shared / f"{name}.json"
    with open(shared / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not said.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed in another worker
            folder.mkdir()
            said.write_text(json.dumps(build(folder)))
    return folder, json.loads(said.read_text())


def bare_nodeid(nodeid: str) -> str:
    """A test's node id without the `@group` suffix xdist gives a grouped test's reports (a group name has no '@';
    a parameter may)."""
    return nodeid[: nodeid.rfind("@")] if nodeid.rfind("@") > nodeid.rfind("]") else nodeid


def longest_first(items: list[pytest.Item], durations: dict[str, float]) -> list[pytest.Item]:
    """The tests in the order the workers are dealt them: the longest unit of work first (a test, or every test of
    an xdist group, which one worker runs in a row), so that no worker starts a minutes-long test while the others
    are nearly done. A test with no recorded time counts as a typical one (the median); ties keep their order."""
    typical = statistics.median(durations.values()) if durations else 0.0
    units: dict[str, list[pytest.Item]] = {}
    for item in items:
        group = item.get_closest_marker("xdist_group")
        key = f"group {group.args[0] if group.args else group.kwargs['name']}" if group else item.nodeid
        units.setdefault(key, []).append(item)
    cost = {key: sum(durations.get(item.nodeid, typical) for item in unit) for key, unit in units.items()}
    return [item for key in sorted(units, key=lambda key: -cost[key]) for item in units[key]]


def stage_name(argv: list[str]) -> str:
    """`python -m stages train <model>` (argv: [.../stages/__main__.py, train, <model>]) -> 'train@<model>', as dvc.yaml
    names it."""
    return "@".join(argv[1:])


def requires_cuda(test: Any) -> Any:
    """Mark a test `gpu` (scripts/gpu-check.sh runs those) and skip it where CUDA is absent."""
    skip = pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA device")
    return pytest.mark.gpu(skip(test))


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


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is left."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM a process started with start_new_session=True and its whole group; SIGKILL what lingers."""
    pgid = proc.pid  # the session leader's pid is the group id
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not group_alive(pgid):
            break
        os.killpg(pgid, sig)
        for _ in range(600):
            proc.poll()  # reap the leader, or it stays in the group as a zombie
            if not group_alive(pgid):
                break
            time.sleep(0.1)


def wait_for_http(proc: subprocess.Popen[Any], url: str, log: Path, tries: int = 1200) -> None:
    """Poll `url` (every 0.1 s, `tries` times) until it answers HTTP 200; fail with the log if `proc` exits first."""
    for _ in range(tries):
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} never answered:\n{log.read_text()}")


def start_background(cmd: list[str], health_url: str, log: Path, cwd: Path | None = None,
                     env: dict[str, str] | None = None, tries: int = 1800) -> subprocess.Popen[bytes]:
    """Start a server in its own process group (output to `log`) and return once `health_url` answers 200.

    The one way the tests start a server (the tracking server, `mlflow models serve`,
    `./tasks.sh serve`); stop it with stop_group, which stops its workers too.
    """
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or run_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for_http(proc, health_url, log, tries)  # up to three minutes on a busy machine
    except BaseException:
        stop_group(proc)
        raise
    return proc


@contextmanager
def background(cmd: list[str], health_url: str, log: Path, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """start_background for the length of a block; the whole process group is stopped after, and checked gone."""
    proc = start_background(cmd, health_url, log, cwd, env)
    try:
        yield proc
    finally:
        stop_group(proc)
        assert not group_alive(proc.pid), f"processes of group {proc.pid} ({cmd[0]}) outlived it"


def mlflow_server_command(folder: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """scripts/mlflow-server.sh on 127.0.0.1:`port` with its store in `folder`: the command and its environment. A new
    store is made as the stages make theirs (store.new_sqlite_store), not by the server's migrations (~1.3 s of CPU)."""
    from pipeline.tracking import store

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "mlflow.db").exists():
        store.new_sqlite_store(folder / "mlflow.db")
    return [str(SERVER_SCRIPT)], run_env(SERVER_DIR=str(folder), PORT=str(port), WORKERS="1",
                                         MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")


@contextmanager
def served_model(model_uri: str, cwd: Path, env: dict[str, str], log: Path) -> Iterator[str]:
    """`mlflow models serve --env-manager local` on a free 127.0.0.1 port; yields its URL, stops its group after."""
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1"]
    with background(cmd, f"{url}/ping", log, cwd, env):
        yield url


def predict_rest(url: str, rows: list[list[float]]) -> list[float]:
    """POST rows to a model server's /invocations; its predictions, one per row."""
    body = json.dumps({"inputs": rows}).encode()
    request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        answer = json.loads(resp.read())["predictions"]
    return [float(p[0]) if isinstance(p, list) else float(p) for p in answer]


SECRETS = {"API_TOKEN": "tok-5ecret-never-logged", "DB_PASSWORD": "pw-5ecret-never-logged"}


REMOTE_TOKEN = "ghp-5ecret-in-the-remote-url"


N_TRAIN = 420  # train rows under TINY's data.n_samples = 600


def clone(baseline: Path, dest: Path) -> Path:
    """A copy of the baseline (git, DVC cache, outputs) with no MLflow store yet."""
    shutil.copytree(
        baseline, dest, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db", "mlflow.db.lock", "mlartifacts")
    )
    return dest


def clone_with_params(baseline: Path, dest: Path, updates: dict[str, Any]) -> Path:
    """A clone of the baseline with `updates` committed: the stages whose params did not change are up to date (their
    outputs, DVC cache and run cache come with it), so an experiment or a search trial runs only the others."""
    clone(baseline, dest)
    set_params(dest, updates)
    sh(dest, "git", "commit", "-qam", "params")
    return dest


STORE_PATH_COLUMNS = (  # where MLflow's SQLite store writes the workspace's absolute path
    ("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"), ("model_versions", "source"), ("datasets", "dataset_source"),
)


def copy_with_store(repo: Path, dest: Path) -> Path:
    """A `cp -a` copy of a workspace with its MLflow store, the store's paths moved to the copy.

    MLflow keeps absolute artifact locations: without the move, stages in the copy would write
    their artifacts and logged models into `repo`'s mlartifacts/ (a shared fixture).
    """
    subprocess.run(["cp", "-a", str(repo), str(dest)], check=True)
    if (dest / "mlflow.db").exists():
        with closing(sqlite3.connect(dest / "mlflow.db")) as db, db:
            for table, column in STORE_PATH_COLUMNS:
                db.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)", (f"{repo}/", f"{dest}/"))
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


def stage_pids(repo: Path) -> list[int]:
    """Every `python -m stages train mlp` process in `repo` (torchrun's launcher and its ranks)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"stages\0train\0mlp" in (proc / "cmdline").read_bytes() \
                    and (proc / "cwd").resolve() == repo.resolve():
                found.append(int(proc.name))
        except OSError:
            continue
    return sorted(found)


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


def wait_for_checkpoint(repo: Path, stage: str, proc: subprocess.Popen[str], newer_than: float = 0.0,
                        limit: float = 300) -> None:
    """Poll until `stage` writes its checkpoint (modified after `newer_than`): its training loop is running.

    A RUNNING run only says the stage is past pre-flight: it opens its run before reading its data.
    """
    path = repo / ".checkpoints" / f"{stage}.safetensors"
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ended early with {proc.returncode}: {proc.communicate()}"
        if path.exists() and path.stat().st_mtime > newer_than:
            return
        time.sleep(0.2)
    raise AssertionError(f"{stage} never wrote {path.relative_to(repo)}")


def post(url: str, body: bytes, content_type: str) -> tuple[int, str]:
    """POST a raw body to a model server's /invocations; the HTTP status and the body, errors included."""
    request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def bad_requests(n_features: int) -> dict[str, tuple[bytes, str, str]]:
    """Requests a model server must refuse: name -> (body, content type, what its one-line answer contains)."""
    good = [0.5] * n_features

    def rows(*bad: tuple[int, object]) -> bytes:  # two good rows with a value replaced: (column, value) per row
        table = [good.copy(), good.copy()]
        for r, (column, value) in enumerate(bad):
            table[r][column] = value
        return json.dumps({"inputs": table}).encode()  # NaN and Infinity as Python's json writes them

    row = json.dumps(good)
    header = ",".join(f"x{i}" for i in range(n_features))
    csv_row = ",".join(map(str, good))
    json_cases = {
        "null": (rows((0, 0.5), (1, None)), "row 1, column 1: the value is missing"),
        "NaN": (rows((0, float("nan"))), "row 0, column 0: the value is missing"),
        "inf": (rows((0, 0.5), (2, float("inf"))), "row 1, column 2: the value is infinite"),
        "beyond float32": (rows((3, 1e300)), "row 0, column 3"),
        "too few features": (json.dumps({"inputs": [good[1:]]}).encode(), f"has {n_features - 1} values, the model takes {n_features}"),
        "too many features": (json.dumps({"inputs": [good + [0.5]]}).encode(), f"has {n_features + 1} values"),
        "ragged rows": (json.dumps({"inputs": [good, good[1:]]}).encode(), "Invalid input"),
        "a string": (rows((0, "abc")), "could not convert string to float"),
        "malformed JSON": (b'{"inputs": [[0.5, ', "valid JSON"),
        "empty body": (b"", "valid JSON"),
        "empty rows": (b'{"inputs": []}', ""),
        "no inputs key": (b'{"rows": [[0.5]]}', "exactly one of the input fields"),
        "a JSON list": (f"[{row}]".encode(), "Received a list"),
        "malformed 20 MB": (('{"inputs": [' + f"{row}," * (20_000_000 // (len(row) + 1)) + "[").encode(), "valid JSON"),
    }
    csv_cases = {
        "CSV missing value": (f"{header}\n{csv_row[:csv_row.rindex(',')]},\n", f"row 0, column {n_features - 1}: the value is missing"),
        "CSV string": (f"{header}\nabc{csv_row[csv_row.index(','):]}\n", "could not convert"),
        "CSV too few columns": (f"{header[:header.rindex(',')]}\n{csv_row[:csv_row.rindex(',')]}\n", f"has {n_features - 1} values"),
        "CSV empty": ("", "No columns to parse"),
        "CSV malformed": (f'{header}\n{csv_row},1,2,3\n"', "Failed to parse"),
    }
    return {name: (body, "application/json", expect) for name, (body, expect) in json_cases.items()} | {
        name: (body.encode(), "text/csv", expect) for name, (body, expect) in csv_cases.items()
    }


def quiet(stderr: str) -> bool:
    """A normal run's stderr: no warning, no traceback, no error (without a terminal, progress lines instead of bars)."""
    return not re.search(r"warn|traceback|error", stderr, re.IGNORECASE)


def check_logged_models(repo: Path, log_dir: Path, serve: str | None = None) -> None:
    """Every logged model loads through pyfunc (pinned to the CPU) and as an nn.Module in one call
    (`tracking.load_torch_module`), predicting what the stage's safetensors weights predict on test rows;
    the `serve` one (default: the last listed, as `./tasks.sh serve` picks) answers the same over `mlflow models
    serve`'s REST API (JSON and CSV) and refuses bad requests with a 4xx and one line, never a stack trace."""
    from unittest import mock

    import mlflow
    import numpy as np
    import torch

    from pipeline import data, models, tracking

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    exp = client.get_experiment_by_name("regression")
    logged = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
    by_stage = {client.get_run(m.source_run_id).data.tags["stage"]: m for m in logged}
    assert sorted(by_stage) == sorted(f"train@{m}" for m in model_names())
    serve = serve or model_names()[-1]
    X, _ = data.read_split(repo / "data" / "test.parquet")
    X = X[:25]
    for stage, info in by_stage.items():
        name = stage.removeprefix("train@")
        assert info.name == name  # logged models carry the model's name
        weights, _ = models.load_weights(repo / "models" / f"{name}.safetensors")
        with torch.no_grad():
            expected = weights(torch.from_numpy(X)).numpy().ravel()
        pyfunc = mlflow.pyfunc.load_model(info.model_uri)  # no model_config: what `mlflow models serve` does
        assert pyfunc.unwrap_python_model().device == "cpu", stage  # with no model config, on any host
        assert pyfunc.metadata.get_input_schema().inputs[0].shape == (-1, X.shape[1]), stage
        np.testing.assert_array_equal(np.asarray(pyfunc.predict(X)).ravel(), expected)
        with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": uri}):
            module = tracking.load_torch_module(info.model_uri)
        assert isinstance(module, torch.nn.Module) and not module.training, stage
        with torch.no_grad():
            np.testing.assert_array_equal(module(torch.from_numpy(X)).numpy().ravel(), expected)
        if torch.cuda.is_available():  # asked for, the GPU: as an nn.Module and as a pyfunc, close to the CPU's
            with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": uri}):
                module = tracking.load_torch_module(info.model_uri, device="cuda")
            assert next(module.parameters()).device.type == "cuda", stage
            with torch.no_grad():
                np.testing.assert_allclose(module(torch.from_numpy(X).cuda()).cpu().numpy().ravel(), expected, rtol=1e-4, atol=1e-5)
            on_gpu = mlflow.pyfunc.load_model(info.model_uri, model_config={"device": "cuda"})
            assert on_gpu.unwrap_python_model().device == "cuda", stage
            np.testing.assert_allclose(np.asarray(on_gpu.predict(X)).ravel(), expected, rtol=1e-4, atol=1e-5)
        if name == serve:
            env = run_env(MLFLOW_TRACKING_URI=uri)
            with served_model(info.model_uri, repo, env, log_dir / f"serve-{name}.log") as url:
                np.testing.assert_allclose(predict_rest(url, X.tolist()), expected, rtol=1e-6, atol=1e-6)
                csv = "\n".join([",".join(f"x{i}" for i in range(X.shape[1]))] + [",".join(map(repr, r)) for r in X.tolist()])
                status, body = post(url, csv.encode(), "text/csv")
                assert status == 200, body
                np.testing.assert_allclose(np.ravel(json.loads(body)["predictions"]), expected, rtol=1e-6, atol=1e-6)
                for case, (request, content_type, says) in bad_requests(X.shape[1]).items():
                    status, body = post(url, request, content_type)
                    answer = json.loads(body)
                    assert 400 <= status < 500 and "stack_trace" not in answer, (case, status, body[:2000])
                    assert says in answer["message"] and "\n" not in answer["message"], (case, answer)
                    assert len(body) < 1000, (case, body[:2000])  # no echo of the request


def run_queue(repo: Path, env: dict[str, str] | None = None, deadline_s: float = 1500, jobs: int = 2) -> str:
    """`dvc queue start -j <jobs>`, wait until nothing is queued or running, stop the workers and wait until they have
    exited (as the search does, pipeline/search.py: left alone, they quit up to 10 s later); the last `dvc queue
    status`. Its output goes to a file: the workers inherit it, and a pipe would stay open as long as they run."""
    from pipeline.search import poll_delay, workers_gone

    with tempfile.TemporaryFile("w+") as output:
        start = subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", str(jobs)], cwd=repo,
                               env=warm.queue_env(env or run_env()), stdout=output, stderr=subprocess.STDOUT,
                               text=True)  # as the search starts its workers: each experiment's DVC process warm
        output.seek(0)
        assert start.returncode == 0, f"dvc queue start exited {start.returncode}:\n{output.read()}"
    end, delay, before = time.monotonic() + deadline_s, 0.0, ""
    try:
        while any(word in (status := dvc(repo, "queue", "status").stdout) for word in ("Queued", "Running")):
            assert time.monotonic() < end, f"queue still busy after {deadline_s:.0f} s:\n{status}"
            delay, before = poll_delay(delay, changed=status != before), status
            time.sleep(delay)
        return status
    finally:
        dvc(repo, "queue", "stop", check=False)
        workers_gone(repo)


def experiments(repo: Path) -> dict[str, dict[str, Any]]:
    """`dvc exp show --json` as {exp name: {'rev', 'params', 'metrics'}} for the baseline's finished experiments
    (a failed one, such as a pruned trial's, has no commit, params or metrics)."""
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    baseline = next(b for b in shown if b["name"] == "main")
    out = {}
    for exp in baseline["experiments"] or []:
        rev = exp["revs"][0]
        if (exp.get("executor") or {}).get("state") == "failed" or not rev.get("data"):
            continue
        out[rev["name"]] = {
            "rev": rev["rev"],
            "params": rev["data"]["params"]["params.yaml"]["data"],
            "metrics": {k: v["data"] for k, v in rev["data"]["metrics"].items()},
        }
    return out


PG_TOOLS = ("initdb", "pg_ctl", "postgres", "createdb")


PG_USER, PG_PASSWORD, PG_DB = "mlflow", "mlflow-test-password", "mlflow"


def pg_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin (Debian's layout) with every tool, else one on PATH."""
    folders = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: p.parent.name.zfill(4), reverse=True)
    if initdb := shutil.which("initdb"):
        folders.append(Path(initdb).parent)
    return next((f for f in folders if all((f / tool).is_file() for tool in PG_TOOLS)), None)


def pg_owner() -> tuple[list[str], int, int]:
    """(command prefix, uid, gid) to run the server as: ourselves, or `postgres` via runuser when root."""
    if os.geteuid() != 0:
        return [], os.getuid(), os.getgid()
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as (apt-get install -y postgresql)")
    runuser = shutil.which("runuser", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if not runuser:  # (an admin tool: not on every root PATH, e.g. under `env -i`)
        pytest.skip("running as root and `runuser` (util-linux) is missing to start PostgreSQL as `postgres`")
    return [runuser, "-u", "postgres", "--"], user.pw_uid, user.pw_gid


def run_checked(cmd: list[str], **env: str) -> None:
    """Run a command with extra environment variables; fail with its output when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")


# ---------------------------------------------------------------- a fault-injecting proxy


Match = Callable[[str, str, bytes], bool]
HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "content-length"}


class FaultProxy:
    """An HTTP proxy to `upstream` that fails every request from the first one `fail_when`'s match accepts on.

    mode "503" answers 503 (what a server behind a load balancer says while down), "403" MLflow's
    PERMISSION_DENIED, "drop" closes the connection unanswered. The failing request never reaches
    the server. `kill_at(n, pid)` SIGKILLs `pid` when the n-th request from now arrives (then drops it);
    `before(match, action)` runs `action` once, when the first request `match` accepts arrives, and then
    forwards that request (the tests fill a disk at a known moment of a stage this way).
    """

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.host, self.port = parts.hostname, parts.port
        self.lock = threading.Lock()
        self.match: Match | None = None
        self.mode = "503"
        self.broken = False
        self.once = False  # heal after the first request that fails
        self.failed: list[str] = []  # "METHOD path" of each request answered with a fault
        self.count = 0
        self.kill: tuple[int, int] | None = None
        self.killed_at = ""
        self.hook: tuple[Match, Callable[[], None]] | None = None
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are two writes: with Nagle each answer waits ~40 ms

            def handle_one(self) -> None:
                body = self._body()
                with proxy.lock:
                    proxy.count += 1
                    if proxy.hook is not None and proxy.hook[0](self.command, self.path, body):
                        action, proxy.hook = proxy.hook[1], None
                        action()
                    if proxy.match is not None and proxy.match(self.command, self.path, body):
                        proxy.broken, proxy.match = True, None
                    fault = proxy.mode if proxy.broken else None
                    if proxy.kill is not None and proxy.count >= proxy.kill[0]:
                        os.kill(proxy.kill[1], signal.SIGKILL)
                        proxy.kill, proxy.killed_at, fault = None, f"{self.command} {self.path}", "drop"
                    if fault:
                        proxy.failed.append(f"{self.command} {self.path}")
                        proxy.broken = proxy.broken and not proxy.once
                if fault == "drop":
                    self.close_connection = True
                    return
                if fault is not None:
                    text = {"503": b"Service Unavailable",
                            "403": b'{"error_code": "PERMISSION_DENIED", "message": "Permission denied"}'}[fault]
                    self._answer(int(fault), [("Content-Type", "application/json" if fault == "403" else "text/plain")], text)
                    return
                upstream = http.client.HTTPConnection(proxy.host, proxy.port, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    resp = upstream.getresponse()
                    data = resp.read()
                    self._answer(resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP], data)
                finally:
                    upstream.close()

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_one  # noqa: N815 (the stdlib's names)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail_when(self, match: Match, mode: str = "503", once: bool = False) -> None:
        """Fail from the first request `match` accepts on, until `heal` (`once`: that request only)."""
        with self.lock:
            self.match, self.mode, self.broken, self.failed, self.once = match, mode, False, [], once

    def fail_now(self, mode: str = "drop") -> None:
        """Fail every request from now on (the server is gone), until `heal`."""
        self.fail_when(lambda *_: True, mode)

    def heal(self) -> None:
        with self.lock:
            self.match, self.broken = None, False

    def kill_at(self, n: int, pid: int) -> None:
        """SIGKILL `pid` when the n-th request from now arrives."""
        with self.lock:
            self.count, self.kill, self.killed_at = 0, (n, pid), ""

    def before(self, match: Match, action: Callable[[], None]) -> None:
        """Run `action` when the first request `match` accepts arrives, before forwarding it."""
        with self.lock:
            self.hook = (match, action)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------- a small disk


@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's syntax: 64k, 2m) mounted on `where` for a block; unmounted after, lazily if busy.

    Skips the test where mounting is not permitted (not root, or a container without CAP_SYS_ADMIN).
    """
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (the disk-full tests fill one)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}): the disk-full tests need one")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=True)


def fill_disk(folder: Path, leave: int) -> None:
    """Fill the file system holding `folder` with a ballast file until `leave` bytes are free (or fewer)."""
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    with open(folder / ".ballast", "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, max(free - leave, 0))


# what differs between two runs of one stage anyway: the process, the spool, and `pipeline` (it hashes the
# workspace's uncommitted edits, here the experiment's name)
VOLATILE_TAGS = {"process.pid", "process.started", "spool.synced", "mlflow.loggedModels", "closed.reason", "pipeline",
                 "mlflow.source.name"}  # and the copy of the project it ran in
WALL_CLOCK = re.compile(r"seconds|per_second")  # metrics of wall time: compared by their points, not their values


def store_content(client: Any, experiment: str, since: int = 0, base: tuple[str, ...] = ()) -> dict[str, Any]:
    """What an experiment holds, without what differs between two runs of the same stage (ids, times, process tags).

    Runs that started at or after `since` (ms) are compared whole; the runs in `base` (made before)
    by what was added to them since (metric points logged from `since` on, artifacts, tags). Metrics:
    (last value, points); logged models: their statuses; the registry: versions (run ids named by
    stage) and aliases.
    """
    exp = client.get_experiment_by_name(experiment)
    found = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    runs = [r for r in found if r.info.run_id in base or r.info.start_time >= since]
    names = {r.info.run_id: f"<{r.data.tags.get('stage')}#{i}>" for i, r in enumerate(runs)}

    def plain(value: str) -> str:
        for run_id, name in names.items():
            value = value.replace(run_id, name)
        return value

    def artifacts(run_id: str, path: str | None = None) -> list[str]:
        out = []
        for f in client.list_artifacts(run_id, path):
            out += artifacts(run_id, f.path) if f.is_dir else [f.path]
        return sorted(out)

    def metrics(run: Any) -> dict[str, tuple[float, int]]:
        out = {}
        for key, value in run.data.metrics.items():
            points = [m for m in client.get_metric_history(run.info.run_id, key) if m.timestamp >= since or run.info.run_id not in base]
            out[key] = (None if WALL_CLOCK.search(key) else value, len(points))
        return out

    models = client.search_logged_models([exp.experiment_id])
    registered = [m for m in client.search_registered_models()]
    return {
        "runs": [{
            "stage": r.data.tags.get("stage"), "status": r.info.status, "params": r.data.params, "metrics": metrics(r),
            "tags": {k: plain(v) for k, v in r.data.tags.items() if k not in VOLATILE_TAGS},
            "artifacts": artifacts(r.info.run_id),
            "models": sorted(str(m.status) for m in models if m.source_run_id == r.info.run_id),
        } for r in runs],
        "registry": {
            m.name: sorted((v.version, plain(v.run_id), v.tags.get("test_mse"))
                           for v in client.search_model_versions(f"name = '{m.name}'") if v.run_id in names)
            for m in registered
        },
        "champions": {m.name: dict(m.aliases) for m in registered},
    }


def differences(got: Any, want: Any, where: str = "") -> list[str]:
    """Where two nested values differ: one line per differing leaf."""
    if isinstance(got, dict) and isinstance(want, dict):
        return [d for k in sorted(set(got) | set(want), key=str)
                for d in differences(got.get(k, "<missing>"), want.get(k, "<missing>"), f"{where}.{k}")]
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in differences(g, w, f"{where}[{i}]")]
    return [] if got == want else [f"{where}: {got!r} != {want!r}"]


# `./tasks.sh sync` without the install step: the spool replayed into the store
SYNC = [sys.executable, "-m", "pipeline.warm", "run", "sync"]  # `./tasks.sh sync` without its install step


@contextmanager
def mlflow_server(folder: Path, *args: str, **env: str) -> Iterator[Server]:
    """scripts/mlflow-server.sh (with `args`, and `env` added to its environment) on a free local port, its store in
    `folder` and its log beside it, for the length of a block; its whole process group is stopped after."""
    port = free_port()
    cmd, server_env = mlflow_server_command(folder, port)
    url = f"http://127.0.0.1:{port}"
    with background([*cmd, *args], f"{url}/health", folder.parent / f"{folder.name}.log", env=server_env | env):
        yield Server(url, folder)


@contextmanager
def proxied_server(folder: Path) -> Iterator[FaultProxy]:
    """A real `mlflow server` with its store in `folder`, behind a FaultProxy; both stopped afterwards."""
    with mlflow_server(folder / "store") as server:
        front = FaultProxy(server.url)
        try:
            yield front
        finally:
            front.close()


def warm_log(env: dict[str, str] | None = None) -> str:
    """The log of the warm stage server in `env`'s PIPELINE_WARM_DIR (default: this process's): a line per request."""
    folder = Path((env or os.environ).get("PIPELINE_WARM_DIR") or warm.runtime_dir())
    log = warm.paths(folder)["log"]
    return log.read_text() if log.exists() else ""


def answers(log: str, command: str, cwd: Path | None = None, full: bool = False) -> list[str]:
    """A warm server's answers in `log`, oldest first, to the requests for `command` (a stage: 'train mlp'; another
    command by its module and any first arguments: 'dvc.cli:main exp exec-run'), from `cwd` (default: any folder):
    'run' or 'cold'; with `full`, the whole answer ('run <pid>', 'cold <why>')."""
    where = re.escape(str(cwd)) if cwd else "[^\n]*"
    found = re.findall(rf" in {where}: {re.escape(command)}(?: [^\n]*)? -> ((run|cold)\b[^\n]*)", log)
    return [whole if full else word for whole, word in found]


def served_stages(log: str, answer: str) -> list[str]:
    """The stages (not the other commands, named by their module: `dvc.cli:main …`, `pipeline.search …`) a warm
    server's log shows answered with `answer` ('run' or 'cold')."""
    return re.findall(rf"^\S+ \S+ pid \d+ in .*?: ((?!\S+[.:]\S* )[^\n]*?) -> {answer}\b", log, re.M)


@contextmanager
def warm_server(folder: Path, cwd: Path = ROOT, **env: str) -> Iterator[tuple[dict[str, Any], dict[str, str]]]:
    """A warm stage server of its own in `folder`, started by `cwd`'s pipeline/warm.py: (its state, the environment
    that reaches it). The whole block sees it as this venv's server; it is stopped after, and any started in its place.

    Starting it with captured output also checks that the server holds none of its starter's streams.
    """
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    environ = run_env(PIPELINE_WARM_DIR=str(folder), **env)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPELINE_WARM_DIR", str(folder))
        sh(cwd, sys.executable, "-m", "pipeline.warm", "start", env=environ, timeout=180)
        state = warm.running()
        assert state is not None, warm_log(environ)
        try:
            yield state, environ
        finally:
            deadline = time.monotonic() + 60
            while warm.stop() is not None and time.monotonic() < deadline:  # and one a stage started, loading
                time.sleep(0.1)


def edit_checkpoint_state(path: Path, edit: Callable[[str], str]) -> None:
    """Rewrite the JSON state in a checkpoint's safetensors header with `edit`, as a hand with an editor would:
    the file stays valid safetensors (header length and padding fixed), its tensors and digest untouched."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    before = header["__metadata__"]["state"]
    header["__metadata__"]["state"] = edit(before)
    assert header["__metadata__"]["state"] != before, "the edit changed nothing"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def post_chunked(url: str, chunks: list[bytes], content_type: str) -> tuple[int, str]:
    """POST a body in chunks (Transfer-Encoding: chunked, no Content-Length) to /invocations; status and body."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        conn.request("POST", "/invocations", body=iter(chunks), headers={"Content-Type": content_type},
                     encode_chunked=True)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def trial_runs_against_experiments(repo: Path, study: str) -> dict[str, tuple[dict[str, Any], dict[str, Any], str]]:
    """{DVC experiment: (its train@mlp MLflow run's mlp params, the experiment's mlp params, the run's weights digest
    == the experiment's dvc.lock md5 ? 'same' : 'differ')} for every train@mlp run of `study` in the workspace's store:
    what a run says it trained with against what DVC recorded for the same weights."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("regression").experiment_id
    exps = experiments(repo)
    out = {}
    for run in client.search_runs([exp_id], filter_string=f"tags.`search.study` = '{study}' and tags.stage = 'train@mlp'"):
        name = run.data.tags["dvc.exp_name"]
        lock = yaml.safe_load(sh(repo, "git", "show", f"{exps[name]['rev']}:dvc.lock").stdout)
        md5 = next(o["md5"] for o in lock["stages"]["train@mlp"]["outs"] if o["path"].endswith(".safetensors"))
        logged = {k: v for k, v in run.data.params.items() if k.startswith("mlp.")}
        recorded = {k: str(_dotted(exps[name]["params"], k)) for k in logged}
        out[name] = (logged, recorded, "same" if run.data.tags.get("model.digest") == md5 else "differ")
    return out


def _dotted(params: dict[str, Any], key: str) -> Any:
    """params['a']['b'] for 'a.b' (None where absent): the nested params by the dotted name MLflow logs them under."""
    for part in key.split("."):
        params = params.get(part) if isinstance(params, dict) else None
    return params


def create_user(server: Server, admin: tuple[str, str], user: tuple[str, str]) -> None:
    """Create a user who is not an admin on a basic-auth `server`, as docs/team.md does (the auth app's REST API)."""
    created = json.loads(server.request("/api/2.0/mlflow/users/create", {"username": user[0], "password": user[1]},
                                        auth=admin))
    assert created["user"] == {"id": created["user"]["id"], "is_admin": False, "username": user[0]}, created


def files_holding(secret: str, *roots: Path) -> list[Path]:
    """Every file under `roots` (or a root that is a file) whose bytes hold `secret`, as written or URL-quoted."""
    needles = {secret.encode(), urllib.parse.quote(secret, safe="").encode()}
    files = [f for root in roots for f in ([root] if root.is_file() else root.rglob("*")) if f.is_file()]
    return [f for f in files if any(n in f.read_bytes() for n in needles)]


@contextmanager
def busy_cpus(count: int | None = None, after: Callable[[], bool] = lambda: True,
              until: Callable[[], bool] = lambda: False) -> Iterator[int]:
    """Keep `count` CPUs (default: every one) busy with spinning processes during a block: from when `after()` is
    true until `until()` is (each asked twice a second), or the block's end. Yields how many spin once started."""
    count = count or os.cpu_count() or 1
    spinners: list[subprocess.Popen[bytes]] = []
    done = threading.Event()

    def stop() -> None:
        for proc in spinners:
            proc.kill()
            proc.wait()

    def watch() -> None:
        while not spinners and not after():
            if done.wait(0.5):
                return
        spinners.extend(subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
                        for _ in range(count))
        while not done.wait(0.5):
            if until():
                stop()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield count
    finally:
        done.set()
        watcher.join()
        stop()
