"""Fixtures and hooks only; the helpers they use are in tests/helpers.py."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import pytest

import bench.workspace
from pipeline import warm
from tests.helpers import (
    DURATIONS, PG_DB, PG_PASSWORD, PG_TOOLS, PG_USER, REMOTE_TOKEN, ROOT, SECRETS, ColdRepro, Reproduced, Server,
    bare_nodeid, built_once, committed_params, copy_project, copy_with_store, dvc, free_port,
    known_durations, longest_first, mlflow_server, outputs, pg_bin, pg_owner, run_checked, run_env,
    served_stages, sh, stage_name, store_content, warm_log,
)


@pytest.fixture(scope="session", autouse=True)
def warm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any] | None]:
    """Every stage of the suite starts warm (pipeline/warm.py): from the server `./tasks.sh test` started for this
    venv, else from one this worker starts in a folder of its own and stops at the end. PIPELINE_WARM=0: all cold."""
    if os.environ.get("PIPELINE_WARM") == "0":
        yield None
        return
    if (state := warm.running()) is not None:
        yield state
        return
    folder = tmp_path_factory.mktemp("warm")
    folder.chmod(0o700)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPELINE_WARM_DIR", str(folder))  # the stages the tests start find it through their environment
        state = warm.start(run_env())
        try:
            yield state
        finally:
            warm.stop()
            for other in folder.glob("warm-*.json"):  # servers of other venvs (the docs test's linked .venv)
                with suppress(OSError, ValueError, KeyError):
                    os.kill(json.loads(other.read_text())["pid"], signal.SIGTERM)


@pytest.fixture
def stage_start(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """How the test's stages start, set by indirect parametrization: 'warm' (from the session's server, as everywhere)
    or 'cold' (PIPELINE_WARM=0: each stage a process of its own). The interrupt, resume and fault tests run
    both (cold where the stage being its own process changes what is tested); the rest start warm."""
    start: str = getattr(request, "param", "warm")
    if start == "cold":
        monkeypatch.setenv("PIPELINE_WARM", "0")  # the environment every command of the test gets (run_env)
    before = len(warm_log())
    yield start
    if start == "warm" and os.environ.get("PIPELINE_WARM") != "0":
        assert served_stages(warm_log()[before:], "run"), "no stage of this test started from the warm server"


@pytest.fixture(scope="session")
def defaults_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed params.yaml, as a file outside the workspace: what tests of the defaults load."""
    path = tmp_path_factory.mktemp("defaults") / "params.yaml"
    path.write_text(committed_params())
    return path


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> Reproduced:
    """The run's `dvc repro` of a tiny project (stages from the warm server), committed. Tests read it, or copy it.

    Built once for all the workers (helpers.built_once); each worker gets a copy of its own, its store's paths
    moved (helpers.copy_with_store), so no two workers' commands share a repository. Secrets are in every stage's
    environment and a token in the git remote's URL (the secrets tests look for them in the store).
    """
    def build(folder: Path) -> dict[str, str]:
        repo = copy_project(folder / "repo")
        sh(repo, "git", "remote", "add", "origin", f"https://ci:{REMOTE_TOKEN}@example.invalid/team/pipeline.git")
        proc = dvc(repo, "repro", env=run_env(**SECRETS))
        sh(repo, "git", "add", "-A")
        sh(repo, "git", "commit", "-qm", "baseline run")
        return {"output": proc.stdout + proc.stderr, "stderr": proc.stderr}

    folder, said = built_once(tmp_path_factory, "reproduced", build)
    repo = copy_with_store(folder / "repo", tmp_path_factory.mktemp("reproduced") / "repo")
    return Reproduced(repo, said["output"], said["stderr"])


@pytest.fixture(scope="session")
def cold_repro(tmp_path_factory: pytest.TempPathFactory) -> ColdRepro:
    """The run's cold `dvc repro` of a tiny project, every stage a process of its own: what each stage's process
    imported, and what the repro left (test_warm compares a warm repro with it).

    tests/import_probe is a sitecustomize on PYTHONPATH (so the stages start cold: a warm
    server's child would show the server's preloaded modules, and the server runs no request
    whose start-up variables differ): every stage's process records, at exit, which modules
    under pipeline/ and stages/ it loaded, and which torch compiler modules. Built once for all
    the workers (helpers.built_once): a cold stage costs 6-7 s of CPU.
    """
    def build(folder: Path) -> dict[str, Any]:
        from mlflow.tracking import MlflowClient

        repo = copy_project(folder / "repo")
        out = folder / "imports"
        out.mkdir()
        # DVC's own command line (not the warm `dvc` helper, a project process the probe would record as well)
        proc = sh(repo, sys.executable, "-m", "dvc", "repro",
                  env=run_env(PYTHONPATH=str(ROOT / "tests" / "import_probe"), STAGE_IMPORTS_DIR=str(out)))
        modules: dict[str, set[str]] = {}
        compiler: dict[str, set[str]] = {}
        for record in map(json.loads, (p.read_text() for p in out.glob("*.json"))):
            modules.setdefault(stage_name(record["argv"]), set()).update(record["modules"])
            compiler.setdefault(stage_name(record["argv"]), set()).update(record["compiler"])
        return {"stdout": proc.stdout, "stderr": proc.stderr, "outputs": outputs(repo),
                "lock": (repo / "dvc.lock").read_text(), "git_status": sh(repo, "git", "status", "--porcelain").stdout,
                "store": store_content(MlflowClient(f"sqlite:///{repo / 'mlflow.db'}"), "regression"),
                "modules": {k: sorted(v) for k, v in modules.items()},
                "compiler": {k: sorted(v) for k, v in compiler.items()}}

    folder, said = built_once(tmp_path_factory, "cold-repro", build)
    sets = {key: {stage: set(names) for stage, names in said[key].items()} for key in ("modules", "compiler")}
    return ColdRepro(folder / "repo", **said | sets)


@pytest.fixture(scope="session")
def default_repro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's `dvc repro` of the project at its committed defaults (not tiny): what README's figures and the
    defaults' scores come from. Built once for all the workers; copy it (helpers.clone) before changing anything."""
    def build(folder: Path) -> dict[str, str]:
        dvc(bench.workspace.copy_project(folder / "repo", {}), "repro", timeout=1200)
        return {}

    return built_once(tmp_path_factory, "default-repro", build)[0] / "repo"


@pytest.fixture(scope="session")
def preloaded(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The modules a fresh interpreter holds after the warm server's preload (pipeline/warm.py run as a file, as the
    server runs it, from /): what every warm child finds loaded. Built once for all the workers (5 s of CPU)."""
    def build(folder: Path) -> list[str]:
        probe = (f"import json, runpy, sys; runpy.run_path({str(ROOT / 'pipeline' / 'warm.py')!r}, "
                 "run_name='probe')['preload'](); print(json.dumps(sorted(sys.modules)))")
        return json.loads(subprocess.run([sys.executable, "-P", "-c", probe], capture_output=True, text=True,
                                         check=True, cwd="/", env=run_env()).stdout)

    return set(built_once(tmp_path_factory, "preloaded", build)[1])


@pytest.fixture(scope="session")
def baseline(reproduced: Reproduced) -> Path:
    """The reproduced project's folder: copy it (helpers.clone, or helpers.copy_with_store) before changing anything."""
    return reproduced.repo


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A throwaway git+DVC copy of this repository with tiny params (nothing reproduced yet)."""
    return copy_project(tmp_path / "repo")


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


RECORDED: dict[str, float] = {}  # --record-durations: seconds per test in this run


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bad_input: a bad-input case (params, data, store); counted in the summary")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker more than the cores, at most 4 (pyproject's --maxprocesses). Much of a test's time is
    spent waiting on other processes (servers starting, DVC's queue, a store's outage): on 2 cores, 3 workers ran the
    suite in 12 min 53 s where 2 took 19 min 22 s and 4 took 15 min 38 s (same commit; bench/RESULTS.md)."""
    return len(os.sched_getaffinity(0)) + 1


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks to deal the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Keep a module's tests in one xdist worker when they share a module-scoped fixture (a server, a project), or a
    session-scoped one no other module uses.

    The suite runs with `--dist loadgroup` (pyproject.toml): every other test is dealt to
    whichever worker is free, so no worker is left with a whole file of long tests at the end;
    a module-scoped fixture is built once, by the worker that runs its group. A test that names
    its own group (long cases of a module, split across workers) keeps it: each worker that runs
    one of the module's groups builds the module's fixtures for itself.
    """
    def fixtures(item: pytest.Item) -> list[Any]:
        return [defs[-1] for defs in item._fixtureinfo.name2fixturedefs.values()]  # type: ignore[attr-defined]

    modules_using: dict[Any, set[str]] = {}
    for item in items:
        for fixture in fixtures(item):
            modules_using.setdefault(fixture, set()).add(item.module.__name__)  # type: ignore[attr-defined]
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        # a session fixture only one module uses is built once too, not per worker
        if any(f.scope == "module" or (f.scope == "session" and len(modules_using[f]) == 1) for f in fixtures(item)):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))  # type: ignore[attr-defined]
    items[:] = longest_first(items, known_durations())


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--record-durations", action="store_true",
                     help=f"write each test's seconds to {DURATIONS.relative_to(ROOT)} (the order the next runs deal them)")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    nodeid = bare_nodeid(report.nodeid)
    RECORDED[nodeid] = RECORDED.get(nodeid, 0.0) + report.duration  # setup, call and teardown


def pytest_sessionfinish(session: pytest.Session) -> None:
    """`--record-durations`, in the process that deals the tests (xdist's controller, or the only one)."""
    if session.config.getoption("--record-durations") and not hasattr(session.config, "workerinput") and RECORDED:
        seconds = known_durations() | {k: round(v, 1) for k, v in RECORDED.items()}  # a partial run updates its tests
        DURATIONS.write_text(json.dumps(dict(sorted(seconds.items())), indent=0) + "\n")


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


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Any]:
    """Start scripts/mlflow-server.sh on a free local port; stop its process group afterwards."""
    numbers = itertools.count()  # one folder and log per server
    with ExitStack() as stack:

        def start(*args: str, **env: str) -> Server:
            return stack.enter_context(mlflow_server(tmp_path / f"server{next(numbers)}", *args, **env))

        yield start


@pytest.fixture
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster on 127.0.0.1 and a free port, in its own temp folder; yield its database URI."""
    bin_dir = pg_bin()
    if bin_dir is None:
        pytest.skip(f"PostgreSQL binaries ({', '.join(PG_TOOLS)}) not found in /usr/lib/postgresql/*/bin or on PATH; "
                    "install them with `apt-get install -y postgresql` (.ci/run does)")
    prefix, uid, gid = pg_owner()
    base = Path(tempfile.mkdtemp(prefix="pg-test-"))  # not under pytest's tmp_path: that is private to root
    data, port = base / "data", free_port()
    try:
        pwfile = base / "password"
        pwfile.write_text(PG_PASSWORD + "\n")
        for path in (base, pwfile):
            os.chown(path, uid, gid)
        run_checked([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", PG_USER, f"--pwfile={pwfile}",
              "--auth=scram-sha-256", "-E", "UTF8"])
        run_checked([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "postgres.log"), "-w",
              "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {base}", "start"])
        try:
            run_checked([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, PG_DB],
                 PGPASSWORD=PG_PASSWORD)
            yield f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{port}/{PG_DB}"
        finally:
            run_checked([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])
            assert not (data / "postmaster.pid").exists(), "PostgreSQL did not stop"
    finally:
        shutil.rmtree(base, ignore_errors=True)
