"""The warm stage server: third-party modules loaded once, a child forked per stage (and per `./tasks.sh sync`, per
search and comparison, and per DVC command of a search).

Every stage process used to pay `import torch, mlflow` (seconds, more under load) before any
work. A server, one per virtual environment, imports those modules once and waits on a Unix
socket. `python -m stages …` (stages/__main__.py, the client) sends its argv, working directory,
environment and stdin/stdout/stderr here; the server forks a child that runs the stage as a fresh
process would (params.yaml checked first): the project's own code imported fresh from the client's
working directory, with the client's environment, streams and interpreter settings. The client
relays Ctrl-C and SIGTERM to the child and exits with the child's status, so DVC sees the process
it started behave as the stage itself.

What could make a warm stage differ from a cold one sends it back to run cold: another virtual
environment or a changed install (the server then exits), other interpreter flags, or other values
of the variables that libraries read when they are imported (PYTHON*, OMP_*, CUDA_*, TORCH*, ...).

Safety: the socket sits in a directory only its user can open (0700), the server checks each
peer's uid (SO_PEERCRED), and there is no TCP. Before forking, the server has started no Python
thread, initialised no CUDA and opened no store. A child dies with the server (PR_SET_PDEATHSIG),
and with its client: a client that disappears (SIGKILL) has its child's process group killed.

Linux only (fork, SO_PEERCRED, prctl); elsewhere every stage runs cold. Stdlib only at module
level, and only what the client needs: every stage's client imports this module (before torch), so
the modules only the server and the command line use are imported where they are used (about 0.02 s
of CPU less per stage). The server runs this file as a script (`python -P pipeline/warm.py serve`),
so no project module is ever loaded in it.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import gc
import hashlib
import importlib
import io
import json
import os
import runpy
import selectors
import shlex
import signal
import socket
import stat
import struct
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable, MutableMapping
from contextlib import suppress
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, NoReturn, TextIO

IN_CHILD = False  # set in a forked child before it runs the stage: the stage then never hands off again
CLIENT_PID: int | None = None  # set in a forked child: the pid of the process that handed it the command

# Third-party modules every stage imports, loaded once by the server (never the project's own). torch's compiler,
# which the stages' public calls import, is loaded through the same calls (preload; tests/test_stage_deps.py).
PRELOAD = (
    "numpy", "torch", "torch.nn.functional", "torch.distributed", "safetensors.torch",
    "pandas", "pyarrow", "pyarrow.parquet", "yaml", "pydantic", "tqdm", "requests",
    "matplotlib", "matplotlib.figure", "matplotlib.ticker", "matplotlib.backends.backend_agg",
    "sqlalchemy", "alembic", "mlflow", "mlflow.tracking", "mlflow.pyfunc", "mlflow.models",
    "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
    # what a stage loads when it runs: MLflow's git lookup (GitPython), run and system-metrics code, the SQLite
    # dialect, torchrun's launcher (stages/distributed.py): about 0.1 s of CPU less each stage
    "git", "mlflow.store.tracking.sqlalchemy_workspace_store", "mlflow.system_metrics.system_metrics_monitor",
    "mlflow.tracing.export", "mlflow.tracing.processor.otel", "mlflow.models.display_utils", "opentelemetry.sdk.metrics",
    "sqlalchemy.dialects.sqlite", "alembic.command", "torch.distributed.run",
    # DVC's command line and what its commands load (MODULES' "dvc"): 0.5 s of CPU once, about 0.3 s less each command
    "dvc.cli.parser", "dvc.repo", "dvc.repo.index", "dvc.repo.reproduce", "dvc.repo.experiments.show",
    "dvc.repo.experiments.queue.celery", "scmrepo.git", "dvc_data.index",
    # ... and what they load when they run (the graph, the git backend, tables, the queue's celery and kombu parts,
    # metrics/params/plots): 0.05-0.1 s less each command
    "networkx", "pygit2", "scmrepo.git.backend.pygit2.filter", "rich", "ruamel.yaml", "dvc.repo.graph", "dvc.repo.stage",
    "dvc.repo.plots", "dvc.repo.metrics.diff", "dvc.repo.params.diff", "dvc.repo.brancher", "dvc.repo.artifacts",
    "dvc.repo.datasets", "dvc.repo.open_repo", "dvc.repo.experiments.queue.tempdir",
    "dvc.repo.experiments.queue.workspace", "dvc.cachemgr", "dvc.data_cloud", "dvc.ui.table", "dvc.utils.strictyaml",
    "dvc_data.hashfile.db.local", "dvc_render.vega", "dvc_render.html", "dvc_task.app", "dvc_task.proc.manager",
    "celery.worker", "celery.app.control", "kombu.transport.filesystem",
)
# Variables read when those modules (or the interpreter) start: a request with other values runs cold.
STARTUP_PREFIXES = ("PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "CUDA_", "NVIDIA_", "TORCH",
                    "PYTORCH_", "LD_", "MPL", "ARROW_", "JE_", "GIT_PYTHON_", "OTEL_")
# Not compared: applied to the child's own streams; and the compile cache folder, which torch exports into the
# environment of any process that used its compiler (read only when compiling, from the child's environment).
PER_REQUEST = frozenset({"PYTHONUNBUFFERED", "TORCHINDUCTOR_CACHE_DIR"})
# Set by torchrun for each rank of a data-parallel stage and read when the rank joins its group, never at import: not
# compared, so the ranks start warm too. Its split of the cores, OMP_NUM_THREADS (stages/distributed.py), a child
# applies itself (torch.set_num_threads, as OpenMP applies it when a fresh process starts) where the server has none.
LAUNCH_PREFIXES = ("TORCHELASTIC_", "TORCH_NCCL_ASYNC_ERROR_HANDLING")
THREADS = "OMP_NUM_THREADS"
# Every stage process starts with these (a value the user set wins), cold or warm, before torch loads:
# OpenMP threads that wait spin briefly, then sleep (pipeline/cores.py says what it was measured against);
# MKL (torch's matrix products on x86 CPUs) takes its COMPATIBLE code branch, the one Intel documents for the same
# results on Intel and compatible CPUs (its default branch picks kernels by CPU maker: an AMD EPYC and an Intel Xeon
# trained other weights from the same data, so a clone's `dvc repro` changed dvc.lock); no cost measured.
STAGE_ENV = {"GOMP_SPINCOUNT": "1000", "MKL_CBWR": "COMPATIBLE"}
DEFAULT_IDLE_MINUTES = 15.0
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# What a child may run with the client's arguments: the stages (`python -m stages`), and the commands that load the
# same heavy modules, as `module:function` (`./tasks.sh sync` is `python -m pipeline.warm run sync`; cold, it spends
# about 3 s importing mlflow). `python -m pipeline.warm run dvc …` is DVC's command line, for the DVC commands the
# search runs (a trial's queueing, the looks at its batch, its experiments' `dvc exp exec-run`: queue_env) and the
# suite's. `python -m pipeline.search` and `python -m pipeline.compare` hand themselves off as a stage does (about 1.5
# s of CPU less each: MLflow). None of these starts a server where none runs.
MODULES = {"stages": "stages", "sync": "pipeline.tracking.spool:main", "dvc": "dvc.cli:main", "search": "pipeline.search",
           "compare": "pipeline.compare"}
NO_START = frozenset({"dvc", "search", "compare"})  # commands run cold where no server runs, without starting one
HEADER = struct.Struct("!Q")
PR_SET_PDEATHSIG = 1


class WarmError(Exception):
    """The warm server cannot be used here; the message says why and what to do."""


# --- where it lives ---------------------------------------------------------------------------------

def runtime_dir() -> Path:
    """The private folder of this user's servers: PIPELINE_WARM_DIR, else $XDG_RUNTIME_DIR/…, else /tmp/…-<uid>."""
    if chosen := os.environ.get("PIPELINE_WARM_DIR"):
        return Path(chosen)
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return Path(base) / "regression-pipeline"
    import tempfile

    return Path(tempfile.gettempdir()) / f"regression-pipeline-{os.getuid()}"


def private_dir() -> Path:
    """runtime_dir(), made if missing; refused unless it is a real folder of this user that nobody else can open."""
    folder = runtime_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise WarmError(f"{folder} is not a folder of this user with mode 0700 (found {stat.filemode(info.st_mode)}, "
                        f"uid {info.st_uid}); remove it, or set PIPELINE_WARM_DIR to another folder")
    return folder


def _prefix() -> str:
    """The virtual environment, by its real path: one reached through a symlink (a project folder opened by another
    path, a workspace whose .venv links to a shared one) is the same venv, and its stages are served."""
    return os.path.realpath(sys.prefix)


def _venv_key() -> str:
    """One server per virtual environment: a short hash of its prefix."""
    return hashlib.sha256(_prefix().encode()).hexdigest()[:12]


def paths(folder: Path | None = None) -> dict[str, Path]:
    """The server's socket, its state file (pid, socket, idle time) and its log, for this venv."""
    base = (folder or runtime_dir()) / f"warm-{_venv_key()}"
    return {kind: base.with_suffix(f".{kind}") for kind in ("sock", "json", "log", "lock")}


def install_stamp() -> str:
    """What the venv holds: its interpreter, prefix, and every installed distribution (name and version).

    A server compares it with its own at every request and every few seconds: a reinstall or an
    upgrade makes it exit, and the request runs cold.
    """
    sites = sorted({sysconfig.get_paths()[key] for key in ("purelib", "platlib")})
    names = sorted(name for site in sites if os.path.isdir(site) for name in os.listdir(site)
                   if name.endswith((".dist-info", ".egg-info", ".pth")))
    digest = hashlib.sha256("\n".join([os.path.realpath(sys.executable), _prefix(), *names]).encode())
    return digest.hexdigest()[:16]


# This file's code as it was loaded: a server whose code differs from a client's is outdated (it exits, the
# request runs cold). Read once, so a server started from a folder that goes away (a queued experiment's) stays.
CODE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def startup_env(environ: dict[str, str]) -> dict[str, str]:
    """The variables that libraries and the interpreter read when they start."""
    return {k: v for k, v in environ.items()
            if k.startswith(STARTUP_PREFIXES) and k not in PER_REQUEST and not k.startswith(LAUNCH_PREFIXES)}


def thread_count(environ: dict[str, str]) -> int | None:
    """OMP_NUM_THREADS when it is one whole number of threads (a child can apply that itself), else None."""
    value = environ.get(THREADS, "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def interpreter() -> dict[str, Any]:
    """The interpreter's own settings that a forked child cannot change: flags (-O, -X ...), warning options.

    `sys._xoptions` is the only place Python gives the -X options (CPython, documented in `sys`).
    """
    flags = {name: getattr(sys.flags, name) for name in type(sys.flags).__match_args__ if name != "safe_path"}
    return {"executable": os.path.realpath(sys.executable), "flags": flags, "warnoptions": list(sys.warnoptions),
            "xoptions": {k: str(v) for k, v in sys._xoptions.items()}}


def idle_minutes(environ: dict[str, str] | os._Environ[str] = os.environ) -> float:
    """PIPELINE_WARM_IDLE (minutes; default 15): how long a server waits for work before it exits."""
    raw = environ.get("PIPELINE_WARM_IDLE", str(DEFAULT_IDLE_MINUTES))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise WarmError(f"PIPELINE_WARM_IDLE: got {raw!r}; allowed: minutes, a number > 0 (default 15)")
    return value


def stage_environment(environ: MutableMapping[str, str] = os.environ) -> None:
    """Give this process the environment every stage starts with (STAGE_ENV); call before torch is imported."""
    for key, value in STAGE_ENV.items():
        environ.setdefault(key, value)


def caller_pid() -> int:
    """The pid a person sees for this command: in a warm child its client's (the process they started, which relays
    their signals), else this process's."""
    return CLIENT_PID or os.getpid()


def enabled() -> bool:
    """Whether stages may use a warm server: PIPELINE_WARM=0 runs everything cold; only Linux has one."""
    return os.environ.get("PIPELINE_WARM", "1") != "0" and sys.platform.startswith("linux") and not IN_CHILD


# --- the client (stages/__main__.py) -------------------------------------------------------------------

def _stream_settings(stream: TextIO | None) -> list[Any] | None:
    if stream is None:
        return None
    return [stream.encoding, stream.errors, stream.line_buffering, getattr(stream, "write_through", False)]


def _process_settings() -> dict[str, Any]:
    """What a process inherits besides its environment: umask, niceness, the CPUs it may run on."""
    umask = os.umask(0)
    os.umask(umask)
    return {"umask": umask, "nice": os.getpriority(os.PRIO_PROCESS, 0), "cpus": sorted(os.sched_getaffinity(0))}


def _request(argv: list[str], module: str) -> bytes:
    return json.dumps({
        "process": _process_settings(),
        "argv": argv, "module": module, "cwd": os.getcwd(), "env": dict(os.environ), "path": sys.path,
        "prefix": _prefix(),
        "stamp": install_stamp(), "code": CODE,
        "interpreter": interpreter(),
        "streams": [_stream_settings(s) for s in (sys.stdin, sys.stdout, sys.stderr)],
    }).encode()


def _connect(path: Path, timeout: float) -> socket.socket | None:
    """A connection to the server at `path`, or None when none answers there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _readline(sock: socket.socket) -> str:
    """One reply line ('' when the server closed the connection first)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(64)
        if not chunk:
            return ""
        data += chunk
    return data.decode().strip()


def handoff(label: str, command: str = "stages", argv: list[str] | None = None,
            before_start: Callable[[], object] = lambda: None) -> int | None:
    """Run this process's stage (sys.argv), or another of MODULES' commands with `argv`, in a warm server's child;
    its exit status, None to run it here, cold.

    Where no server runs, one is started in the background for the stages that follow (this
    one runs cold), except for NO_START's commands; PIPELINE_WARM=0 runs cold and starts none.
    `before_start` runs first (the stage's check of params.yaml: bad input starts nothing).
    """
    if not enabled():
        return None
    try:
        where = paths(private_dir())
    except (OSError, WarmError):
        return None
    sock = _connect(where["sock"], timeout=30)
    if sock is None:
        if command not in NO_START:
            before_start()
            start_in_background()
        return None
    child: list[int] = []
    pending: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        """Ctrl-C, SIGTERM, SIGHUP reach the child as if it were this process (held until it is known)."""
        if not child:
            pending.append(signum)
            return
        try:
            os.kill(child[0], signum)
        except ProcessLookupError:
            pass

    with sock:
        before = {sig: signal.signal(sig, forward) for sig in FORWARDED}
        try:
            for fd in (0, 1, 2):
                os.fstat(fd)
            payload = _request(sys.argv if argv is None else argv, MODULES[command])
            socket.send_fds(sock, [HEADER.pack(len(payload))], [0, 1, 2])
            sock.sendall(payload)
            reply = _readline(sock)
        except OSError:
            reply = ""
        if not reply.startswith("run "):
            for sig, handler in before.items():
                signal.signal(sig, handler)
            if reply == "cold stale" and command not in NO_START:
                before_start()
                start_in_background()
            for signum in pending:  # arrived before the server answered: this process handles it, cold
                os.kill(os.getpid(), signum)
            return None
        child.append(int(reply.split()[1]))
        for signum in pending:
            forward(signum, None)
        return _wait(sock, label)


def _wait(sock: socket.socket, label: str) -> int:
    """The child's exit code, once it ends (a death by signal is repeated on this process)."""
    sock.settimeout(None)
    reply = _readline(sock)
    if not reply.startswith("exit "):
        print(f"{label}: the warm stage server stopped while the stage ran, and the stage with it (its MLflow run is "
              "closed KILLED by the next stage); run it again: it runs cold until a server starts", file=sys.stderr)
        return 137
    code = os.waitstatus_to_exitcode(int(reply.split()[1]))
    if code < 0:  # killed by a signal: die of the same one, as the stage process would have
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


def queue_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for `dvc queue start`: a `dvc` first on PATH that runs DVC's command line in a warm child.

    DVC's queue workers run each experiment as the command `dvc exp exec-run …`, found on PATH
    (dvc/repo/experiments/queue/tasks.py; no setting names it), and on Linux `dvc queue start` starts
    the workers themselves as `dvc exp queue-worker …` the same way. This `dvc` is `python -m
    pipeline.warm run dvc`: each of those DVC processes starts warm (an exec-run 1.39 s of CPU against about
    1.6 s cold: mostly DVC's own work), and runs cold, as before, where no server runs. With warm stages off, `env` as it is. In a warm child too
    (a search runs in one): the workers are processes of their own, clients of the server. tests/test_experiments.py
    and tests/test_search.py fail when the workers stop running it.
    """
    if "0" in (env.get("PIPELINE_WARM"), os.environ.get("PIPELINE_WARM")) or not sys.platform.startswith("linux"):
        return dict(env)
    try:
        folder = private_dir() / f"bin-{_venv_key()}"
        folder.mkdir(mode=0o700, exist_ok=True)
    except (OSError, WarmError):  # no private folder: the experiments run cold, as their stages then do
        return dict(env)
    shim, text = folder / "dvc", f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m pipeline.warm run dvc "$@"\n'
    if not shim.is_file() or shim.read_text() != text:
        fresh = folder / f".dvc-{os.getpid()}"
        fresh.write_text(text)
        fresh.chmod(0o700)
        os.replace(fresh, shim)  # whole, for a worker of another search reading it now
    return {**env, "PATH": f"{folder}{os.pathsep}{env.get('PATH', '')}"}


def _server_command() -> list[str]:
    """The server runs this file as a script with -P: nothing of the project is on its import path."""
    return [sys.executable, "-P", os.path.abspath(__file__), "serve"]


def start_in_background() -> None:
    """Start a server for this venv, fully detached (double fork): no stream of the caller held, no child to reap."""
    log = paths(private_dir())["log"]
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                null = os.open(os.devnull, os.O_RDONLY)
                out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                for target, fd in ((0, null), (1, out), (2, out)):
                    os.dup2(fd, target)
                os.closerange(3, 1 << 16)
                os.chdir("/")
                os.execv(sys.executable, _server_command())
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


# --- the server --------------------------------------------------------------------------------------

class Request(NamedTuple):
    """What a client sent: its command line and the module that runs it, folder, environment, import path, streams
    (as received fds); and its pid (SO_PEERCRED)."""

    argv: list[str]
    module: str
    cwd: str
    env: dict[str, str]
    path: list[str]
    streams: list[list[Any] | None]
    process: dict[str, Any]
    fds: list[int]
    client_pid: int


class Server:
    """The accept-fork-reap loop: one process, no threads, one select over the socket, clients and SIGCHLD."""

    def __init__(self, folder: Path, idle_seconds: float, startup: dict[str, str]) -> None:
        self.where = paths(folder)
        self.idle_seconds = idle_seconds
        self.stamp = install_stamp()
        self.startup = startup
        self.interpreter = interpreter()
        self.children: dict[int, socket.socket] = {}
        self.last_work = time.monotonic()
        self.stopping = ""  # why it stops taking requests: stopped, outdated, idle
        self.selector = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.wake_r, self.wake_w = os.pipe()

    def listen(self) -> None:
        """Bind the socket (a dead server's stale one is replaced), owner-only, and say where it is."""
        path = self.where["sock"]
        if path.exists():
            path.unlink()
        old_umask = os.umask(0o177)
        try:
            self.listener.bind(str(path))
        finally:
            os.umask(old_umask)
        self.socket_ino = os.stat(path).st_ino
        self.listener.listen(64)
        self.listener.setblocking(False)
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._stop)
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        state = {"pid": os.getpid(), "socket": str(path), "idle_minutes": self.idle_seconds / 60,
                 "started": time.time(), "stamp": self.stamp, "executable": sys.executable}
        tmp = self.where["json"].with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.where["json"])

    def _stop(self, _signum: int, _frame: Any) -> None:
        self.stopping = "stopped (SIGTERM)"

    def serve(self) -> Request | None:
        """Run until idle, stopped or outdated (None); in a forked child, return that child's request."""
        while True:
            if not self.children and install_stamp() != self.stamp:
                self.stopping = "outdated (the venv changed)"
            if not self.children and time.monotonic() - self.last_work > self.idle_seconds:
                self.stopping = self.stopping or f"idle for {self.idle_seconds / 60:g} min"
            if self.stopping:
                self._close_listener()
                if not self.children:
                    return None
            for key, _ in self.selector.select(timeout=min(5.0, self.idle_seconds)):
                if key.data == "accept":
                    request = self._accept()
                    if request is not None:
                        return request  # in the child
                elif key.data == "wake":
                    self._drain_wake()
                else:
                    self._client_event(key.fileobj, key.data)  # type: ignore[arg-type]
            self._reap()

    def _close_listener(self) -> None:
        """Take no more requests: the socket file goes (if still ours), so new stages run cold."""
        if self.listener.fileno() < 0:
            return
        self.selector.unregister(self.listener)
        self.listener.close()
        try:
            if os.stat(self.where["sock"]).st_ino == self.socket_ino:
                self.where["sock"].unlink()
                self.where["json"].unlink(missing_ok=True)
        except FileNotFoundError:
            pass

    def _drain_wake(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _accept(self) -> Request | None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return None
        conn.setblocking(True)
        conn.settimeout(10)
        try:
            return self._handle(conn)
        except (OSError, ValueError, KeyError) as exc:
            self._answer(conn, f"cold bad request ({exc})")
            conn.close()
            return None

    def _answer(self, conn: socket.socket, line: str, about: str = "") -> None:
        """Send one reply line, and log it (the log says which stages ran warm, which cold and why)."""
        log(f"{about}-> {line}" if about else line)
        try:
            conn.sendall(f"{line}\n".encode())
        except OSError:
            pass

    def _handle(self, conn: socket.socket) -> Request | None:
        peer, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
        if uid != os.getuid():
            self._answer(conn, f"refused: peer uid {uid} is not this server's user", f"pid {peer} ")
            conn.close()
            return None
        header, fds, _flags, _addr = socket.recv_fds(conn, HEADER.size, 3)
        if not header and not fds:  # a probe (`./tasks.sh warm status`): connected, sent nothing
            conn.close()
            return None
        try:
            if len(header) != HEADER.size or len(fds) != 3:
                raise ValueError("no header or streams")
            (size,) = HEADER.unpack(header)
            payload = b""
            while len(payload) < size:
                chunk = conn.recv(min(1 << 20, size - len(payload)))
                if not chunk:
                    raise ValueError("short request")
                payload += chunk
            req = json.loads(payload)
            self.last_work = time.monotonic()  # asked, even if it answers "cold": not idle
            # a stage is logged by its arguments, another command by its module too (an older client, of another
            # venv or install, names no module: it is answered cold below, saying why)
            command = [] if req.get("module", MODULES["stages"]) == MODULES["stages"] else [req["module"]]
            about = f"pid {peer} in {req['cwd']}: {' '.join(command + req['argv'][1:])} "
            reason = self._cold_reason(req)
            if reason:
                self._answer(conn, f"cold {reason}", about)
                conn.close()
                if reason == "stale":
                    self.stopping = "outdated (a request from another install or pipeline/warm.py)"
                return None
            pid = os.fork()
            if pid == 0:
                self._become_child(conn)
                return Request(req["argv"], req["module"], req["cwd"], req["env"], req["path"], req["streams"],
                               req["process"], fds, peer)
        finally:
            if fds and (not IN_CHILD):
                for fd in fds:
                    os.close(fd)
        with suppress(OSError):  # the child does it too: whichever runs first, a killpg finds the group
            os.setpgid(pid, pid)
        self._answer(conn, f"run {pid}", about)
        conn.setblocking(False)
        self.children[pid] = conn
        self.selector.register(conn, selectors.EVENT_READ, pid)
        return None

    def _cold_reason(self, req: dict[str, Any]) -> str | None:
        """Why this request must run cold (None: it may run here)."""
        if self.stopping:
            return "stopping"
        if req["prefix"] != _prefix():
            return "other venv"
        if req["stamp"] != self.stamp or req["code"] != CODE or install_stamp() != self.stamp:
            return "stale"
        if req.get("module") not in MODULES.values():
            raise ValueError(f"{req['module']} is not one of {', '.join(MODULES.values())}")
        if req["interpreter"] != self.interpreter:
            return "other interpreter settings"
        theirs = startup_env(req["env"])
        if THREADS not in self.startup and thread_count(theirs):
            del theirs[THREADS]  # applied by the child
        if theirs != self.startup:
            names = sorted(k for k in theirs.keys() | self.startup.keys() if theirs.get(k) != self.startup.get(k))
            return f"other start-up variables ({', '.join(names)})"
        return None

    def _become_child(self, conn: socket.socket) -> None:
        """In the fresh child: die with the server, own process group, signals and files as a new process has."""
        global IN_CHILD
        import ctypes  # loaded by the server's torch already

        IN_CHILD = True
        server = os.getppid()
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != server:  # the server died before prctl took effect
            os._exit(137)
        with suppress(OSError):
            os.setpgid(0, 0)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.selector.close()
        self.listener.close()
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)
        for other in self.children.values():
            other.close()
        conn.close()

    def _client_event(self, conn: socket.socket, child: int) -> None:
        """A client's connection became readable: it is gone (EOF), so its stage is stopped at once."""
        try:
            data = conn.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(conn)  # the end of its stream stays readable: one kill, not one per loop
            log(f"child {child}: its client is gone; killing its process group")
            for kill in (os.killpg, os.kill):
                with suppress(ProcessLookupError, PermissionError):
                    kill(child, signal.SIGKILL)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            self.last_work = time.monotonic()
            if conn is not None:
                with suppress(KeyError):  # unless its client is gone (_client_event)
                    self.selector.unregister(conn)
                conn.setblocking(True)
                self._answer(conn, f"exit {status}", f"child {pid} ")
                conn.close()


def log(line: str) -> None:
    """A line in the server's log (its stderr): `warm-<venv>.log` in its folder."""
    now = time.time()
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}.{int(now % 1 * 1000):03d} {line}", file=sys.stderr,
          flush=True)


def preload() -> None:
    """Import the third-party modules the stages use (torch's compiler too), and fill MLflow's map of this venv's
    packages.

    Nothing else runs: no thread, no CUDA, no store. MLflow maps every installed distribution to
    its modules the first time a process saves a model (0.2-0.6 s of reading each distribution's
    file list) and keeps the map; a throwaway model saved here through the public API fills it
    once for every child. The venv cannot change under the server (it exits when it does).
    Warnings are dropped, and the registry of those already shown is reset when the filters are
    put back, so a stage still prints its own.
    """
    for name in PRELOAD:
        importlib.import_module(name)
    # torch.use_deterministic_algorithms (every stage calls it) imports torch's compiler, 1.0-1.8 s; its flags
    # are put back as they were, so each stage sets them itself as a fresh process would
    torch = sys.modules["torch"]
    flags = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    import tempfile

    pyfunc = importlib.import_module("mlflow.pyfunc")
    with tempfile.TemporaryDirectory(prefix="warm-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = Path(tmp, "model.py")
        code.write_text("import mlflow\n\nclass Echo(mlflow.pyfunc.PythonModel):\n"
                        "    def predict(self, context, model_input: list[str], params=None) -> list[str]:\n"
                        "        return model_input\n\nmlflow.models.set_model(Echo())\n")
        pyfunc.save_model(str(Path(tmp, "model")), python_model=str(code), pip_requirements=["mlflow", "torch"])


def serve(idle_seconds: float) -> Request | None:
    """Be the server for this venv until idle, stopped or outdated; returns a request only in a forked child."""
    folder = private_dir()
    where = paths(folder)
    lock = open(where["lock"], "a+")  # held for the server's life: a second server for this venv exits at once
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return None
        raise
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")  # who holds it: `stop` finds a server still loading (no state file yet)
    lock.flush()
    atexit.register(_end_child)  # first registered, last run
    stage_environment()
    startup = startup_env(dict(os.environ))  # as a stage process starts, before any import could change it
    started = time.monotonic()
    preload()
    torch = sys.modules["torch"]
    import threading

    threads = threading.active_count()
    if threads != 1 or torch.cuda.is_initialized():  # a fork would copy a half-held lock or a CUDA context
        raise WarmError(f"preloading left {threads} threads, CUDA initialised: {torch.cuda.is_initialized()}")
    gc.freeze()  # the preloaded objects are never collected: a child's collections neither scan nor copy their pages
    server = Server(folder, idle_seconds, startup)
    server.listen()
    log(f"ready: pid {os.getpid()}, {len(PRELOAD)} modules in {time.monotonic() - started:.1f} s, python threads "
        f"{threads}, CUDA initialised False, no store opened; idle exit after {idle_seconds / 60:g} min")
    request = server.serve()
    lock.close()  # in a child too: closing its copy leaves the server's lock held
    if request is None:
        log(f"exit: {server.stopping}")
    return request


def _text_stream(fd: int, settings: list[Any] | None, unbuffered: bool) -> TextIO | None:
    """A text stream on fd as Python makes it for a new process with the client's settings."""
    if settings is None:
        return None
    encoding, errors, line_buffering, write_through = settings
    mode = "rb" if fd == 0 else "wb"
    binary: BinaryIO = io.open(fd, mode, buffering=0 if unbuffered and fd else -1, closefd=False)  # type: ignore[assignment]
    return io.TextIOWrapper(binary, encoding=encoding, errors=errors,  # type: ignore[return-value]
                            line_buffering=line_buffering, write_through=write_through)


def run_child(request: Request) -> None:
    """In the forked child: take the client's streams, folder, process settings, environment and import path, then
    run the stage."""
    for target, fd in enumerate(request.fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request.cwd)
    settings = request.process
    os.umask(settings["umask"])
    with suppress(OSError):  # `taskset`, `nice dvc repro`: as its caller (as far as the server's own limits allow)
        os.sched_setaffinity(0, settings["cpus"])
    with suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, settings["nice"])
    os.environ.clear()
    os.environ.update(request.env)
    sys.argv[:] = request.argv
    sys.path[:] = request.path
    unbuffered = bool(request.env.get("PYTHONUNBUFFERED"))
    streams = [_text_stream(fd, s, unbuffered) for fd, s in enumerate(request.streams)]
    sys.stdin, sys.stdout, sys.stderr = streams  # type: ignore[assignment]
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = streams  # type: ignore[misc]
    if threads := thread_count(request.env):
        sys.modules["torch"].set_num_threads(threads)  # as a fresh process takes OMP_NUM_THREADS (LAUNCH_PREFIXES)
    import random  # loaded by the server's modules already

    random.seed()  # a fresh process draws its own; the children must not share the server's state
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    importlib.invalidate_caches()
    own = importlib.import_module("pipeline.warm")  # the project's own copy, fresh from the cwd
    own.IN_CHILD, own.CLIENT_PID = True, request.client_pid
    try:
        _run_module(request.module)
    except SystemExit as exc:  # as the interpreter reads it: None is 0, a message (printed by it) is 1
        EXIT_STATUS.append(0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1)
        raise
    except KeyboardInterrupt:
        raise  # the interpreter ends the process by SIGINT itself: no quick exit
    except BaseException:
        EXIT_STATUS.append(1)  # the traceback is printed (sys.excepthook) before the exit handlers run
        raise
    EXIT_STATUS.append(0)


EXIT_STATUS: list[int] = []  # a child's exit status, once its stage has ended


def _end_child() -> None:
    """In a child: end with the stage's exit status once every other exit handler has run.

    Registered by the server before it imports anything, so it runs last (exit handlers run
    in reverse order): the stage's and the libraries' handlers (logging, MLflow) have run and
    the threads were joined. What the interpreter would do after it, tearing down thousands of
    preloaded modules (0.15 s here), frees memory the system frees anyway. Python's own
    forked workers (multiprocessing) end with os._exit too.
    """
    if not IN_CHILD or not EXIT_STATUS:
        return
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    os._exit(EXIT_STATUS[0])


# --- the command line: ./tasks.sh warm [stop|status] ----------------------------------------------------

def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not; one that is our own child is reaped here)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def running() -> dict[str, Any] | None:
    """This venv's server's state (pid, socket, idle minutes) when it is alive and answers; None when none runs."""
    where = paths(runtime_dir())
    try:
        state = json.loads(where["json"].read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not _alive(int(state.get("pid", 0))):
        return None
    sock = _connect(Path(state["socket"]), timeout=2)
    if sock is None:
        return None
    sock.close()
    return state


def _describe(state: dict[str, Any]) -> str:
    return (f"warm stage server: pid {state['pid']}, socket {state['socket']}, stops after "
            f"{state['idle_minutes']:g} idle minutes (./tasks.sh warm stop stops it now)")


def start(environ: dict[str, str] | None = None, timeout: float = 180) -> dict[str, Any]:
    """Start this venv's server (in `environ`, default this process's) unless one runs; its state once it answers."""
    if (state := running()) is not None:
        return state
    idle_minutes(environ or os.environ)  # a bad PIPELINE_WARM_IDLE is refused here, in one line
    import subprocess

    log = paths(private_dir())["log"]
    with open(log, "wb") as out:  # a new log for each server started by hand
        proc = subprocess.Popen(_server_command(), cwd="/", env=environ, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (state := running()) is not None:
            return state
        if proc.poll() is not None and (state := running()) is None:
            if proc.returncode == 0:  # another server for this venv took the lock first: wait for it
                time.sleep(0.05)
                continue
            tail = log.read_text(errors="replace").strip().splitlines()[-1:]
            raise WarmError(f"the warm stage server exited {proc.returncode} before it answered"
                            + (f": {tail[0]}" if tail else "") + f" (log: {log})")
        time.sleep(0.05)
    raise WarmError(f"the warm stage server did not answer within {timeout:.0f} s (log: {log})")


def _loading() -> int | None:
    """The pid of this venv's server while it holds its lock but answers nowhere yet (loading its modules), else None.

    One a stage started in the background a moment ago is such a server: stopped then, it would
    otherwise load for seconds and stay for its idle minutes."""
    try:
        with open(paths(runtime_dir())["lock"]) as held:
            try:
                fcntl.flock(held, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return None  # no server holds it
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            pid = held.read().strip()
    except FileNotFoundError:
        return None
    return int(pid) if pid.isdigit() and _alive(int(pid)) else None


def stop(timeout: float = 60) -> int | None:
    """Stop this venv's server (it finishes the stages it runs first), or one still loading; its pid, None when none
    ran."""
    state = running()
    pid = int(state["pid"]) if state is not None else _loading()
    if pid is None:
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return pid
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return pid


def run(command: str, args: list[str]) -> int:
    """`python -m pipeline.warm run <command> [args]`: MODULES' `command` in a warm child, else here, cold."""
    stage_environment()  # the variables the server was started with (else it answers "cold")
    argv = [sys.argv[0], *args]
    if (code := handoff(command, command, argv)) is not None:
        return code
    sys.argv[:] = argv
    _run_module(MODULES[command])
    return 0


def exit_from(command: str, main: Callable[[], int]) -> NoReturn:
    """End `python -m <module>` of a command that hands itself off (MODULES' search, compare) with its status: from a
    warm child where a server runs (starting none), else from `main()` here."""
    stage_environment()  # the variables the server was started with (else it answers "cold")
    code = handoff(command, command)
    sys.exit(main() if code is None else code)


def _run_module(target: str) -> None:
    """Run one of MODULES: `python -m <module>`, or `sys.exit(<module>.<function>())` for `module:function`."""
    module, _, function = target.partition(":")
    if function:
        sys.exit(getattr(importlib.import_module(module), function)())
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def main(argv: list[str] | None = None) -> int:
    """`./tasks.sh warm [start|stop|status]`: one line each."""
    import argparse

    parser = argparse.ArgumentParser(prog="./tasks.sh warm", description="the warm stage server of this venv")
    parser.add_argument("action", nargs="?", default="start", choices=("start", "stop", "status"))
    args = parser.parse_args(argv)
    try:
        if args.action == "stop":
            pid = stop()
            print(f"warm stage server: stopped (pid {pid})" if pid else "warm stage server: none was running")
        elif args.action == "status":
            state = running()
            print(_describe(state) if state else "warm stage server: none running (./tasks.sh warm starts one)")
            return 0 if state else 1
        else:
            print(_describe(start()))
    except WarmError as exc:
        print(f"warm: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"] and sys.argv[2:3] and sys.argv[2] in MODULES.keys() - {"stages"}:
        sys.exit(run(sys.argv[2], sys.argv[3:]))
    elif sys.argv[1:] == ["serve"]:
        try:
            _request_in_child = serve(idle_minutes() * 60)
        except WarmError as exc:
            print(f"warm: {exc}", file=sys.stderr)
            sys.exit(2)
        if _request_in_child is None:
            sys.exit(0)
        run_child(_request_in_child)
    else:
        sys.exit(main())
