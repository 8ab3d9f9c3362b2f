"""The warm stage server (pipeline/warm.py): same results as a cold stage, signals, its life cycle, who may use it.

Most tests of the suite run their stages through the session's server (tests/conftest.py);
these check what only the server can get wrong, each with a server of its own where the test
stops, kills or outdates it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

from pipeline import cores, warm
from tests.helpers import (
    DVC, ROOT, SYNC, ColdRepro, answers, copy_project, dvc, model_names, outputs, run_env, served_stages, sh, statuses,
    store_content, wait_for_checkpoint, warm_log, warm_server,
)

LONG_MLP = {"mlp.epochs": 100_000, "mlp.patience": 100_000, "checkpoint.min_seconds": 0.0}


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _log_of(repo: Path, since: int) -> str:
    """The session server's log lines, from offset `since`, for requests from `repo` (other workers' are mixed in)."""
    return "".join(ln for ln in warm_log()[since:].splitlines(keepends=True) if f" in {repo}: " in ln)


# ---------------------------------------------------------------- same results


def _masked(text: str, repo: Path) -> list[str]:
    """DVC's output of a repro with what differs between two runs of the same state masked (ids, paths, numbers)."""
    text = text.replace(str(repo), "<repo>")
    text = re.sub(r"\b[0-9a-f]{32}\b", "<run>", text)
    return [re.sub(r"\d+(\.\d+)?", "<n>", line) for line in text.splitlines()]


@pytest.mark.slow
def test_warm_and_cold_stages_give_the_same_bytes_runs_and_lines(tmp_path: Path, cold_repro: ColdRepro) -> None:
    """A warm repro against the run's cold one (conftest.cold_repro: the same tiny project, every stage a process of
    its own)."""
    hot = copy_project(tmp_path / "warm")
    started = time.time() * 1000
    before = warm_log()
    warm_proc = dvc(hot, "repro")
    served = warm_log()[len(before):]
    stages = ("generate", *(f"train {m}" for m in model_names()), "evaluate")
    for stage in stages:
        assert answers(served, stage, hot) == ["run"], f"{stage} did not run warm: {answers(served, stage, hot, full=True)}"
    assert {s.replace(" ", "@") for s in stages} <= set(cold_repro.modules), "each cold stage was a process of its own"
    assert outputs(hot) == cold_repro.outputs and cold_repro.outputs
    assert (hot / "dvc.lock").read_text() == cold_repro.lock
    assert _masked(warm_proc.stdout, hot) == _masked(cold_repro.stdout, cold_repro.repo)
    assert _masked(warm_proc.stderr, hot) == _masked(cold_repro.stderr, cold_repro.repo)

    from mlflow.tracking import MlflowClient

    content = [cold_repro.store, json.loads(json.dumps(  # as the cold one's: through JSON
        store_content(MlflowClient(f"sqlite:///{hot / 'mlflow.db'}"), "regression", since=int(started))))]
    for run in content[0]["runs"] + content[1]["runs"]:
        run["tags"] = {k: v for k, v in run["tags"].items() if not k.startswith(("git.", "mlflow.source."))}
    assert content[1] == content[0]
    assert sh(hot, "git", "status", "--porcelain").stdout == cold_repro.git_status


# ---------------------------------------------------------------- signals and deaths


@pytest.fixture
def long_training(tmp_path: Path) -> Path:
    """A tiny project with its data generated and an MLP that would train for hours."""
    repo = copy_project(tmp_path / "repo", LONG_MLP)
    sh(repo, sys.executable, "-m", "stages", "generate")
    return repo


@pytest.mark.slow
def test_sigkill_of_the_client_kills_the_stage_within_a_second(long_training: Path, spawn: Any) -> None:
    repo = long_training
    before = warm_log()
    client = spawn([sys.executable, "-m", "stages", "train", "mlp"], repo)
    wait_for_checkpoint(repo, "train@mlp", client)
    (child,) = [int(a.split()[1]) for a in answers(warm_log()[len(before):], "train mlp", repo, full=True)]
    assert _alive(child)
    client.send_signal(signal.SIGKILL)
    client.communicate()
    deadline = time.monotonic() + 1.0
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(child), "the stage went on after its client was killed"
    gone = re.findall(rf"child {child}: its client is gone", warm_log()[len(before):])
    assert len(gone) == 1, f"{len(gone)} lines"  # the server saw the end of the client's stream once, not in a loop
    checkpoint = repo / ".checkpoints" / "train@mlp.safetensors"
    mtime = checkpoint.stat().st_mtime
    time.sleep(1.5)
    assert checkpoint.stat().st_mtime == mtime and not (repo / "models" / "mlp.safetensors").exists()


@pytest.mark.slow
def test_a_killed_server_fails_its_stage_like_a_killed_stage_and_the_next_runs_cold(
    long_training: Path, tmp_path: Path, spawn: Any,
) -> None:
    repo = long_training
    with warm_server(tmp_path / "own") as (state, env):
        client = spawn([sys.executable, "-m", "stages", "train", "mlp"], repo, env)
        wait_for_checkpoint(repo, "train@mlp", client)
        (child,) = [int(a.split()[1]) for a in answers(warm_log(env), "train mlp", full=True)]
        os.kill(state["pid"], signal.SIGKILL)
        _, err = client.communicate(timeout=30)
        assert client.returncode == 137
        assert err.strip().splitlines()[-1].startswith("train@mlp: the warm stage server stopped while the stage ran")
        assert "Traceback" not in err
        time.sleep(0.5)
        assert not _alive(child)
        assert statuses(repo) == {"generate": ["FINISHED"], "train@mlp": ["RUNNING"]}
        log_before = warm_log(env)
        sh(repo, sys.executable, "-m", "stages", "train", "linear_gd", env=env)
        assert not answers(warm_log(env)[len(log_before):], "train linear_gd")  # it ran cold: no server answered it
        assert statuses(repo) == {"generate": ["FINISHED"], "train@mlp": ["KILLED"], "train@linear_gd": ["FINISHED"]}
        deadline = time.monotonic() + 60  # the cold stage started a new server in the background
        while warm.running() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert warm.running() is not None and warm.running()["pid"] != state["pid"]


# ---------------------------------------------------------------- never stale, only you


@pytest.fixture
def running(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[dict[str, Any], dict[str, str]]]:
    """The suite's warm server, which has served other tests' stages (its state, the environment that reaches it);
    one of the test's own where the suite starts its stages cold. For the tests that only ask it things."""
    state = request.getfixturevalue("warm_server")
    if state is not None:
        yield state, run_env()
        return
    with warm_server(tmp_path / "own") as own:
        yield own


@pytest.mark.slow
def test_the_server_loads_no_project_code_no_thread_no_cuda_no_store(
    running: tuple[dict[str, Any], dict[str, str]], preloaded: set[str],
) -> None:
    state, env = running
    pid = state["pid"]
    (ready,) = [line for line in warm_log(env).splitlines() if f" ready: pid {pid}," in line]
    assert "python threads 1, CUDA initialised False, no store opened" in ready
    opened = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with suppress(FileNotFoundError):  # closed since the listing (a request's streams, handed to its child)
            opened.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    assert not [f for f in opened if f.endswith((".db", ".sqlite"))], opened
    assert Path(f"/proc/{pid}/cwd").resolve() == Path("/")  # it holds no project folder
    # what the server imports (PRELOAD) brings in none of the project's modules: a child imports them fresh
    assert not [m for m in preloaded if m.split(".")[0] in ("pipeline", "stages", "bench", "tests")]


@pytest.mark.slow
def test_an_edited_server_exits_and_its_requests_run_cold(tmp_path: Path) -> None:
    repo = copy_project(tmp_path / "repo")
    with warm_server(tmp_path / "own", cwd=repo) as (state, env):
        with (repo / "pipeline" / "warm.py").open("a") as fh:
            fh.write("\n# an edit\n")
        proc = sh(repo, sys.executable, "-m", "stages", "generate", env=env)
        assert proc.returncode == 0
        deadline = time.monotonic() + 30
        while _alive(state["pid"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(state["pid"]), "an outdated server kept running"
        assert re.search(r"exit: outdated", warm_log(env))
    with open(warm.paths(tmp_path / "own")["lock"]) as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no server holds it: none is left for its idle minutes


@pytest.mark.slow
def test_requests_of_another_venv_or_start_up_run_cold_and_the_server_stays(
    running: tuple[dict[str, Any], dict[str, str]], tmp_path: Path,
) -> None:
    state, env = running
    request = {"argv": ["stages", "generate"], "cwd": str(tmp_path), "env": {}, "path": [], "prefix": "/elsewhere",
               "stamp": "x", "interpreter": {}, "streams": [None, None, None]}
    assert _raw_request(Path(state["socket"]), request) == "cold other venv"
    repo = copy_project(tmp_path / "repo")
    # what torchrun gives each rank runs warm: its variables, and its thread count, which the child applies
    rank = {"OMP_NUM_THREADS": "1", "TORCHELASTIC_RUN_ID": "x", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert sh(repo, sys.executable, "-m", "stages", "generate", env=env | rank).returncode == 0
    proc = sh(repo, sys.executable, "-m", "stages", "generate", env=env | {"MKL_NUM_THREADS": "1"})
    assert proc.returncode == 0 and (repo / "data" / "truth.json").exists()
    linked = tmp_path / "linked-venv"  # this venv by another path: the same venv, served
    linked.symlink_to(Path(sys.prefix).resolve())
    assert sh(repo, str(linked / "bin" / "python"), "-m", "stages", "generate", env=env).returncode == 0
    (first, second, third) = answers(warm_log(env), "generate", repo, full=True)
    assert first.startswith("run ") and second == "cold other start-up variables (MKL_NUM_THREADS)"
    assert third.startswith("run "), third
    assert warm.running() is not None
    assert (warm.thread_count({"OMP_NUM_THREADS": "3"}), warm.thread_count({"OMP_NUM_THREADS": "2,1"})) == (3, None)


def _raw_request(path: Path, request: dict[str, Any]) -> str:
    """Send a request as the client does (header + our stdio + JSON); the server's first answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        payload = json.dumps(request).encode()
        try:
            socket.send_fds(sock, [warm.HEADER.pack(len(payload))], [0, 1, 2])
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # a refusal answers at once and closes: its line is still there to read
        return sock.recv(200).decode().strip()


@pytest.mark.slow
def test_idle_server_exits_on_its_own(tmp_path: Path) -> None:
    with warm_server(tmp_path / "own", PIPELINE_WARM_IDLE="0.02") as (state, env):  # 1.2 s
        deadline = time.monotonic() + 30
        while _alive(state["pid"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(state["pid"])
        assert not Path(state["socket"]).exists()
        assert "exit: idle for 0.02 min" in warm_log(env)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_a_peer_of_another_uid_is_refused() -> None:
    """The folder's mode keeps other users out; with it loosened on purpose, the uid check (SO_PEERCRED) still does."""
    folder = Path(tempfile.mkdtemp(prefix="warm-uid-"))  # not under pytest's tmp_path: that is private to root
    try:
        with warm_server(folder / "own") as (state, env):
            for path, mode in ((folder, 0o711), (folder / "own", 0o711), (Path(state["socket"]), 0o666)):
                path.chmod(mode)
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the other user: a raw request, the answer back through the pipe
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                    os.write(write, _raw_request(Path(state["socket"]), {}).encode())
                except BaseException as exc:
                    os.write(write, repr(exc).encode())
                finally:
                    os._exit(0)
            os.close(write)
            os.waitpid(pid, 0)
            with os.fdopen(read) as answer:
                assert answer.read() == "refused: peer uid 65534 is not this server's user"
            assert not subprocess.run(["pgrep", "-P", str(state["pid"])], capture_output=True).stdout  # none forked
            assert "refused: peer uid 65534" in warm_log(env)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_tasks_warm_starts_shows_and_stops_the_server_in_one_line_each(tmp_path: Path) -> None:
    if not list((ROOT / ".venv").glob(".installed-*")):
        pytest.skip("the project is not installed in .venv: ./tasks.sh install")  # never install from a test
    env = run_env(PIPELINE_WARM_DIR=str(tmp_path / "own"))

    def tasks(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(ROOT / "tasks.sh"), "warm", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=180)  # would time out if the server held the caller's streams

    started = tasks()
    assert (started.returncode, started.stderr) == (0, "")
    line = re.fullmatch(r"warm stage server: pid (\d+), socket (\S+), stops after 15 idle minutes "
                        r"\(\./tasks\.sh warm stop stops it now\)\n", started.stdout)
    assert line, started.stdout
    pid, sock = int(line[1]), Path(line[2])
    assert sock.is_socket() and (sock.parent.stat().st_mode & 0o777) == 0o700 and _alive(pid)
    assert tasks("status").stdout == tasks().stdout == started.stdout  # a second start shows the one running
    assert tasks("stop").stdout == f"warm stage server: stopped (pid {pid})\n"
    assert not _alive(pid) and not sock.exists()
    gone = tasks("status")
    assert (gone.returncode, gone.stdout) == (1, "warm stage server: none running (./tasks.sh warm starts one)\n")


def test_sync_runs_in_a_warm_child_with_the_lines_and_exit_codes_of_a_cold_one(tmp_path: Path) -> None:
    """`./tasks.sh sync` (`python -m pipeline.warm run sync`) is served like a stage: same output and exit code."""
    repo = copy_project(tmp_path / "repo")
    before = len(warm_log())
    results = {}
    for start in ("warm", "cold"):
        env = run_env(**({"PIPELINE_WARM": "0"} if start == "cold" else {}))
        for args in ([], ["--bogus"]):
            proc = subprocess.run([*SYNC, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
            results[start, *args] = (proc.returncode, proc.stdout, proc.stderr)
    assert results["warm",] == results["cold",] and results["warm",][0] == 0 and "nothing to sync" in results["warm",][1]
    assert results["warm", "--bogus"] == results["cold", "--bogus"] == (
        2, "", "sync: unknown arguments --bogus; allowed: none, --upgrade-store, --help\n")
    assert answers(warm_log()[before:], "pipeline.tracking.spool:main", repo) == ["run", "run"], warm_log()[before:]


def test_dvc_commands_run_in_a_warm_child_as_in_a_process_of_their_own_and_start_no_server(tmp_path: Path) -> None:
    """`python -m pipeline.warm run dvc …` (the search's DVC commands, and the suite's `dvc` helper): the output and
    exit code of `python -m dvc …`; where no server runs, it runs cold and starts none."""
    repo = copy_project(tmp_path / "repo")
    before = len(warm_log())
    commands = (["status", "--json"], ["repro", "--dry", "train@mlp"], ["repro", "no-such-stage"])
    for args in commands:
        cold = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=run_env(), capture_output=True,
                              text=True, timeout=120)
        hot = subprocess.run([*DVC, *args], cwd=repo, env=run_env(), capture_output=True, text=True, timeout=120)
        assert (hot.returncode, hot.stdout, hot.stderr) == (cold.returncode, cold.stdout, cold.stderr), args
    assert cold.returncode != 0 and "no-such-stage" in cold.stderr  # the last one fails
    assert answers(warm_log()[before:], "dvc.cli:main", repo) == ["run"] * len(commands), warm_log()[before:]
    assert not served_stages(_log_of(repo, before), "run"), "a DVC command is not counted as a stage"

    none = tmp_path / "no-server"
    none.mkdir(mode=0o700)
    proc = subprocess.run([*DVC, "status", "--json"], cwd=repo, env=run_env(PIPELINE_WARM_DIR=str(none)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout) == json.loads(
        subprocess.run([*DVC, "status", "--json"], cwd=repo, env=run_env(), capture_output=True, text=True).stdout)
    time.sleep(1)
    assert not list(none.iterdir()), "a DVC command started a server"


@pytest.mark.bad_input
def test_bad_params_and_model_names_are_the_cold_lines_warm_and_start_no_server(tmp_path: Path,
                                                                              request: pytest.FixtureRequest) -> None:
    """The client hands a stage off before params.yaml's schema is loaded (it stays light); the child checks the file
    first: the same line and exit code as a cold stage. Where no server runs, a bad file starts none."""
    repo = copy_project(tmp_path / "repo")
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text().replace("epochs: 3", "epochs: three", 1))
    cases = {("train", "mlp"): "train@mlp: ", ("train", "No-Such"): "usage: python -m stages", ("evaluate",): "evaluate: "}
    before = len(warm_log())
    for args, start in cases.items():
        hot = subprocess.run([sys.executable, "-m", "stages", *args], cwd=repo, env=run_env(), capture_output=True,
                             text=True, timeout=120)
        cold = subprocess.run([sys.executable, "-m", "stages", *args], cwd=repo, env=run_env(PIPELINE_WARM="0"),
                              capture_output=True, text=True, timeout=120)
        assert (hot.returncode, hot.stdout, hot.stderr) == (cold.returncode, cold.stdout, cold.stderr), args
        assert hot.returncode == 2 and hot.stdout == "" and hot.stderr.count("\n") == 1, (args, hot.stderr)
        assert hot.stderr.startswith(start) and ("mlp.epochs" in hot.stderr or "No-Such" in args), hot.stderr
    assert len(served_stages(_log_of(repo, before), "run")) == len(cases), "each was checked in a warm child"

    none = tmp_path / "no-server"
    none.mkdir(mode=0o700)
    proc = subprocess.run([sys.executable, "-m", "stages", "train", "mlp"], cwd=repo,
                          env=run_env(PIPELINE_WARM_DIR=str(none)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "mlp.epochs" in proc.stderr, proc.stderr
    time.sleep(1)
    assert not list(none.iterdir()), "a bad params.yaml started a server"
    request.node.user_properties.append(("bad_input_cases", len(cases) + 1))


# ---------------------------------------------------------------- fast checks


def test_queue_env_puts_a_warm_dvc_first_on_path_or_leaves_the_environment(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvc queue start`'s environment (the search's, the tests'): a `dvc` that hands itself off first on PATH; with
    warm stages off, or no private folder, the environment as it is (the experiments then run cold)."""
    own = tmp_path / "own"
    own.mkdir(mode=0o700)
    monkeypatch.setenv("PIPELINE_WARM_DIR", str(own))
    env = {"PATH": "/usr/bin:/bin", "X": "1"}
    got = warm.queue_env(env)
    first = Path(got["PATH"].split(os.pathsep)[0])
    assert got["PATH"] == f"{first}{os.pathsep}/usr/bin:/bin" and got["X"] == "1" and first.parent == own
    shim = first / "dvc"
    assert os.access(shim, os.X_OK) and f"{sys.executable} -m pipeline.warm run dvc" in shim.read_text()
    assert warm.queue_env({**env, "PIPELINE_WARM": "0"}) == {**env, "PIPELINE_WARM": "0"}
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    monkeypatch.setenv("PIPELINE_WARM_DIR", str(shared))
    assert warm.queue_env(env) == env


@pytest.mark.bad_input
def test_a_folder_others_can_open_is_refused_in_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "open"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    env = run_env(PIPELINE_WARM_DIR=str(folder))
    proc = subprocess.run([sys.executable, "-m", "pipeline.warm"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"warm: {folder} is not a folder of this user with mode 0700 (found drwxr-xr-x, uid " \
                          f"{os.getuid()}); remove it, or set PIPELINE_WARM_DIR to another folder\n"


@pytest.mark.bad_input
def test_a_bad_idle_time_is_one_line(tmp_path: Path) -> None:
    env = run_env(PIPELINE_WARM_DIR=str(tmp_path / "w"), PIPELINE_WARM_IDLE="soon")
    proc = subprocess.run([sys.executable, "-m", "pipeline.warm"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (2, "warm: PIPELINE_WARM_IDLE: got 'soon'; allowed: minutes, a number > 0 "
                                                 "(default 15)\n")


def test_stages_training_at_once_share_the_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_WARM_DIR", str(tmp_path / "w"))
    monkeypatch.setattr(cores, "usable_cores", lambda: 8)
    folder = warm.private_dir() / "training"
    folder.mkdir()
    other = subprocess.Popen(["sleep", "60"])
    try:
        (folder / str(other.pid)).touch()
        (folder / "999999999").touch()  # a stage that died: not counted, and removed
        assert cores.claim(most=16) == 4
        assert cores.claim(most=3) == 3  # never more than it had (OMP_NUM_THREADS, torchrun's split)
        assert sorted(p.name for p in folder.iterdir()) == sorted([str(other.pid), str(os.getpid())])
    finally:
        other.kill()
        other.wait()
    assert cores.claim(most=16) == 8  # alone again


def test_every_stage_process_starts_with_the_wait_policy_and_mkls_reproducible_branch() -> None:
    env: dict[str, str] = {}
    warm.stage_environment(env)
    assert env == {"GOMP_SPINCOUNT": "1000", "MKL_CBWR": "COMPATIBLE"}
    env = {"GOMP_SPINCOUNT": "5", "MKL_CBWR": "AUTO"}
    warm.stage_environment(env)
    assert env == {"GOMP_SPINCOUNT": "5", "MKL_CBWR": "AUTO"}  # the user's own values win
