"""Where runs go, and opening it: URI, workspace root, health check, SQLite checks, the experiment, backup, lock.

Where runs go is decided once, here: `MLFLOW_TRACKING_URI` when set (a team
server), else `mlflow.db` and `mlartifacts/` at the workspace root. The root is
DVC's `DVC_ROOT` when DVC runs the stage, which for queued experiments is the
real workspace rather than the temp copy they run in, so no run is lost with it.
A URI's credentials (`http://alice:secret@host:port`) stay in the environment: every
line, tag, spool file and error that names a store shows it through `redact`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import mlflow
import requests
import sqlalchemy.exc
from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import PipelineError, first_line

# MLflow's SQL store announces a new store's tables at INFO, and logs every SQLite error it catches (a locked,
# full or read-only store) at ERROR with its SQL and two tracebacks (some 65 lines) before raising it. Every
# such error reaches the project as that exception and is reported in one line (a TrackingError, or the spool's
# line through failure_reason), so that logger stays silent: stderr is kept for the one line.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
CHECK_TIMEOUT = 5.0  # seconds pre-flight waits for a locked SQLite store
WAIT_POLL = 2.0  # seconds between asking a server that is down again, within mlflow.wait_seconds
BATCH = 1000  # MLflow's limit on metrics per log_batch call
PARAM_BATCH = 100  # ... and on params


T = TypeVar("T")  # what a retried write returns
_USERINFO = re.compile(r"(?<=://)[^/\s?#]*@")  # `user:password@` after a scheme, up to the last @ of the host part


def redact(text: str) -> str:
    """`text` with the userinfo of every URI in it shown as `***` (`http://***@host:port`).

    A tracking URI may carry a password; what the project prints, tags, spools or raises
    goes through here, so the password stays in the environment it came from.
    """
    return _USERINFO.sub("***@", text)


class TrackingError(PipelineError):
    """The tracking store cannot be used; the message names the URI (redacted) and the cause."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


class StoreUnreachable(TrackingError):
    """The tracking server does not answer, or fails (an outage, not a refusal): a stage spools its run."""


class PermissionRefused(TrackingError):
    """The server answered 401/403: this user may not do it. Not an outage: waiting or syncing again cannot help."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# What a store or server that fails mid-run raises: the run is then spooled, not lost.
OUTAGE = (MlflowException, OSError, requests.RequestException, sqlalchemy.exc.SQLAlchemyError, StoreUnreachable)

_answered: set[str] = set()  # servers whose /health answered in this process: one check per stage


def workspace_root() -> Path:
    """The DVC workspace: DVC_ROOT when DVC runs us, else the nearest folder with dvc.yaml."""
    if root := os.environ.get("DVC_ROOT"):
        return Path(root).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").exists():
            return folder
    return here


def tracking_uri(root: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI when set, else the embedded SQLite store at the workspace root."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    return f"sqlite:///{(root or workspace_root()) / STORE_FILE}"


def is_server(uri: str) -> bool:
    """True for a tracking server (http/https), False for a database URI."""
    return uri.startswith(("http://", "https://"))


def credentials(uri: str) -> tuple[str, str] | None:
    """The user and password MLflow's client sends to `uri` as HTTP Basic auth, or None.

    The URI's userinfo when it has one (MLflow's client goes through requests, which puts a
    URL's userinfo over MLflow's own header), else MLFLOW_TRACKING_USERNAME and _PASSWORD.
    """
    parts = urlsplit(uri)
    if parts.username is not None:
        return unquote(parts.username), unquote(parts.password or "")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    return (user, password) if user and password else None


def login_tag(uri: str) -> dict[str, str]:
    """The tag `mlflow.user` naming the user a server URI logs in as (its userinfo); else no tag.

    MLflow's client names a run's user after MLFLOW_TRACKING_USERNAME, else the system's user,
    never after the URI's: with this tag a URI with userinfo works as the variables do.
    """
    user = urlsplit(uri).username if is_server(uri) else None
    return {"mlflow.user": unquote(user)} if user is not None else {}


def _health_request(uri: str) -> urllib.request.Request:
    """GET <server>/health with the credentials as MLflow's client sends them, not as part of the host name.

    urllib reads `alice:secret@127.0.0.1` as a host to look up; the userinfo is sent as an
    Authorization header instead, so a proxy that guards /health lets the check through.
    """
    parts = urlsplit(uri)
    base = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl().rstrip("/")
    request = urllib.request.Request(f"{base}/health")
    if creds := credentials(uri):
        request.add_header("Authorization", "Basic " + b64encode(":".join(creds).encode()).decode())
    return request


def _check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes of retries, when a tracking server is down."""
    try:
        with urllib.request.urlopen(_health_request(uri), timeout=timeout) as resp:
            if resp.status != 200:
                raise StoreUnreachable(f"MLflow server at {uri} answered /health with HTTP {resp.status}")
    except (urllib.error.URLError, OSError) as exc:
        if isinstance(exc, urllib.error.HTTPError) and exc.code in (401, 403):  # a proxy that guards /health too
            raise permission_refused(uri, exc.code, "checking /health") from None
        reason = getattr(exc, "reason", exc)
        raise StoreUnreachable(
            f"MLflow tracking server at {uri} is not reachable ({reason}); start it, "
            "or unset MLFLOW_TRACKING_URI to use the local store"
        ) from None


def use_server(uri: str, wait: float = 0.0, who: str = "") -> None:
    """Bound MLflow's HTTP retries (minutes by default), then check the server answers (once per process).

    A server that does not answer is asked again every few seconds for `wait` seconds
    (params.yaml's mlflow.wait_seconds for a stage), announced in one line, so a short
    blip between queued experiments costs nothing. A stage's pre-flight and its run
    both come here; the second finds the answer and asks no more. A server that fails
    after that is an outage of the run: spooled.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ[MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.name] = "true"  # it prints the URI as given: print_run_link
    if uri in _answered:
        return
    deadline = time.monotonic() + wait
    try:
        _check_server(uri)
    except StoreUnreachable as exc:
        if wait <= 0:
            raise
        print(f"{who or 'tracking'}: {str(exc).split('; ')[0]}; waiting up to {wait:g} s for it (mlflow.wait_seconds)",
              file=sys.stderr, flush=True)
        while True:
            time.sleep(max(0.0, min(WAIT_POLL, deadline - time.monotonic())))
            try:
                _check_server(uri)
                break
            except StoreUnreachable as again:
                if time.monotonic() >= deadline:
                    raise StoreUnreachable(f"{again} (waited {wait:g} s, mlflow.wait_seconds)") from None
    _answered.add(uri)


def print_run_link(uri: str, experiment_id: str, run_id: str, run_name: str) -> None:
    """The two lines MLflow's client prints when a run on a server ends, with the URI redacted.

    MLflow prints the tracking URI as given, password and all, so use_server turns its
    printing off; a stage prints them here instead.
    """
    experiment = f"{redact(uri).rstrip('/')}/#/experiments/{experiment_id}"
    print(f"🏃 View run {run_name} at: {experiment}/runs/{run_id}\n🧪 View experiment at: {experiment}", flush=True)


def is_sqlite(uri: str) -> bool:
    """True for an embedded SQLite store (a file; `sqlite:///path`)."""
    return uri.startswith("sqlite:///")


def sqlite_file(uri: str) -> Path:
    """The file behind a SQLite store URI."""
    return Path(uri.removeprefix("sqlite:///"))


def preflight(wait: float = 0.0, who: str = "") -> str:
    """Check the store can be read and written before a stage does expensive work; return its URI.

    A server that is down fails here after `wait` seconds of asking again (not after
    minutes of MLflow's retries, and not after the data was generated or the model
    trained); whether this user may write runs is answered when the stage opens its run,
    also before any work (stage_run). A SQLite
    store that is missing its folder, damaged, locked, read-only or of another
    schema fails with the file and what to do, instead of a traceback after the work.
    """
    uri = tracking_uri()
    if is_server(uri):
        use_server(uri, wait, who)
    elif is_sqlite(uri):
        path = sqlite_file(uri)
        if not path.parent.is_dir():
            raise TrackingError(f"MLflow store {uri}: folder {path.parent} does not exist; create it or fix MLFLOW_TRACKING_URI")
        with store_lock(path, required=False):  # a store another stage is creating (connect) is waited for
            check_sqlite_store(path)
    return uri


def open_existing(uri: str) -> MlflowClient:
    """A client for a store that must already exist: reading never creates an empty SQLite file."""
    if is_server(uri):
        use_server(uri)
    elif is_sqlite(uri):
        path = sqlite_file(uri)
        if not path.exists():
            raise TrackingError(f"no MLflow store at {path}; run `dvc repro` first, or set MLFLOW_TRACKING_URI")
        with store_lock(path, required=False):  # a store a stage is creating is waited for, not called broken
            check_sqlite_store(path)
    return MlflowClient(uri)


def _schema_head() -> str:
    """The schema revision this MLflow writes, to tell a store it cannot use before it touches it.

    No public API names it (a new store made to ask would cost seconds on every check), so this is the one
    private MLflow call; tests/test_tracking_store.py fails when MLflow moves it or it stops matching a new store.
    """
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def new_sqlite_store(path: Path) -> None:
    """Make the new SQLite store `path` as a copy of an empty store of this MLflow's schema (tables, no experiment).

    MLflow makes a new store by running every schema migration it has, about 1.3 s of CPU for each new workspace's
    first stage (and each test's); the empty store is made once per virtual environment by MLflow's own `mlflow db
    upgrade` of an empty file and kept in the venv, named by MLflow's version and schema. Opening the copy, MLflow
    adds its Default experiment as it does to a store it made. Outside a venv, or where the venv is read-only,
    MLflow makes the store as before. Call it holding store_lock(path), or on a path no other process knows yet (a
    new spool).
    """
    if sys.prefix == sys.base_prefix:
        return
    empty = Path(sys.prefix) / "share" / "regression-pipeline" / f"mlflow-{mlflow.__version__}-{_schema_head()}.db"
    try:
        if not empty.exists():
            from mlflow.db import upgrade  # the `mlflow db upgrade` command: on an empty file, tables at the head

            empty.parent.mkdir(parents=True, exist_ok=True)
            making = empty.with_name(f".{empty.name}.{os.getpid()}")
            making.unlink(missing_ok=True)
            upgrade.main([f"sqlite:///{making}"], standalone_mode=False)
            os.replace(making, empty)  # whole or not there: stages of other workspaces may make it at once
        copying = path.with_name(f"{path.name}.{os.getpid()}.new")  # ignored by git, like the store
        shutil.copyfile(empty, copying)
        os.replace(copying, path)
    except OSError:
        return  # a read-only venv: MLflow makes the store


def check_sqlite_store(path: Path, timeout: float = CHECK_TIMEOUT) -> None:
    """Read the schema version and take (then roll back) a write lock: one line naming the file on failure."""
    aside = f"move it aside (`mv {path} {path}.broken`) to start a new store, or restore it from a backup ({path.name}.*.bak)"
    try:
        if path.exists() and not os.access(path.parent, os.W_OK):
            raise sqlite3.OperationalError("attempt to write a readonly database")
        if not path.exists():  # a new store: MLflow creates it; the folder must take the file
            if not os.access(path.parent, os.W_OK):
                raise sqlite3.OperationalError(f"folder {path.parent} is not writable")
            return
        with closing_sqlite(path, timeout) as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables:
                version = con.execute("SELECT version_num FROM alembic_version").fetchone() if "alembic_version" in tables else None
                if version is None:
                    raise TrackingError(f"MLflow store {path} is not an MLflow database (no schema version); {aside}")
                if version[0] != (head := _schema_head()):
                    raise TrackingError(
                        f"MLflow store {path} has schema {version[0]}, this MLflow needs {head}; "
                        "run `./tasks.sh sync --upgrade-store` (backs it up, then `mlflow db upgrade`)"
                    )
            con.execute("BEGIN IMMEDIATE")
            con.execute("CREATE TABLE _preflight_write_check (x INTEGER)")
            con.execute("ROLLBACK")
    except sqlite3.DatabaseError as exc:
        reason = str(exc)
        if "locked" in reason or "busy" in reason:
            hint = f"another process held it for {timeout:g} s; wait for it to finish (`fuser {path}` names it)"
        elif "readonly" in reason or "read-only" in reason or "unable to open" in reason:
            hint = f"make the file and its folder writable (check `ls -l` and `lsattr` on {path})"
        else:
            hint = aside
        raise TrackingError(f"MLflow store {path} cannot be used ({reason}); {hint}") from None


@contextmanager
def closing_sqlite(path: Path, timeout: float) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection in autocommit mode, always closed."""
    con = sqlite3.connect(str(path), timeout=timeout, isolation_level=None)
    try:
        yield con
    finally:
        con.close()


def backup_store(path: Path) -> Path | None:
    """Copy the SQLite store with SQLite's online backup before it is repaired or migrated; return the copy."""
    if not path.exists():
        return None
    dest = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}.bak")
    with closing_sqlite(path, CHECK_TIMEOUT) as src, closing_sqlite(dest, CHECK_TIMEOUT) as dst:
        src.backup(dst)
    return dest


def upgrade_store() -> int:
    """Back up the embedded store (SQLite online backup), then migrate it with `mlflow db upgrade`; its exit code."""
    uri = tracking_uri()
    if not is_sqlite(uri):
        raise TrackingError(f"{uri} is not the embedded SQLite store; upgrade it on the server")
    backup = backup_store(sqlite_file(uri))
    print(f"sync: backed up {sqlite_file(uri)} to {backup}", file=sys.stderr)
    return subprocess.run([sys.executable, "-m", "mlflow", "db", "upgrade", uri]).returncode


@contextmanager
def store_lock(store: Path, required: bool = True) -> Iterator[None]:
    """Serialise store creation (concurrent first-time SQLite migrations crash) and registry promotions.

    The lock is a file beside the SQLite file `store` (mlflow.db.lock at the workspace root for the
    default store), so every process using that store takes the same one, whatever its workspace.
    Creation (connect) holds it from the empty file to the last migration; pre-flight and readers
    take it before they check the schema, so a store being created is waited for, never called
    broken (a half-made store has tables but no schema version yet). `required=False`: where no
    lock file can be made (a read-only folder), go on without it.
    """
    try:
        fh = open(store.with_name(f"{store.name}.lock"), "a")
    except OSError:
        if required:
            raise
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# MLflow 3's experiment kind (values: the UI bundle's experiment kinds; its "experiment type" switch
# writes this tag). The 3.17 UI lets the browser's GenAI / Model training toggle decide instead, so
# links add `?workflowType=machine_learning` (docs/mlflow-ui.md); the tag keeps other readers right.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def point_fluent_api_at(uri: str) -> None:
    """Make `uri` the store of MLflow's fluent API (the active run, Model.log), and nothing else.

    mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which `tracking_uri` reads as
    the user's choice: a spool's URI would then pass for the store itself for the rest of the
    process. The variable is put back as it was.
    """
    with environ_kept("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(uri)


@contextmanager
def environ_kept(*names: str) -> Iterator[None]:
    """Put the environment variables `names` back as they were after the block: MLflow sets some as a side effect."""
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def all_pages(search: Callable[[str | None], Any]) -> Iterator[Any]:
    """Every result of a paged MLflow search, fetched a page at a time: `search(page_token)` returns one page."""
    token = None
    while True:
        page = search(token)
        yield from page
        token = page.token
        if not token:
            return


def connect(experiment: str) -> tuple[MlflowClient, str]:
    """Open the store (creating it and the experiment once, safely); return (client, experiment id).

    On a server, a refusal of this user is PermissionRefused (the stage stops before work), any
    other failure StoreUnreachable (an outage: the stage spools its run and works on).
    """
    root = workspace_root()
    uri = tracking_uri(root)
    if is_server(uri):
        use_server(uri)  # a no-op after the stage's pre-flight: one /health check per stage
    point_fluent_api_at(uri)
    if is_sqlite(uri):
        path = sqlite_file(uri)
        with store_lock(path):  # the lock pre-flight waits on: nobody sees the store half made
            if not path.exists():
                new_sqlite_store(path)
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(
                experiment, artifact_location=(root / ARTIFACT_DIR).as_uri(), tags=dict([EXPERIMENT_KIND])
            )
        _tag_kind(client, exp, exp_id)
        return client, exp_id
    client = MlflowClient(uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        try:
            exp_id = exp.experiment_id if exp else client.create_experiment(experiment, tags=dict([EXPERIMENT_KIND]))
        except MlflowException as exc:  # another stage created it first: no file lock reaches a server
            exp = client.get_experiment_by_name(experiment)
            if exp is None or permission_status(exc):
                raise
            exp_id = exp.experiment_id
        _tag_kind(client, exp, exp_id)
    except OUTAGE as exc:
        if status := permission_status(exc):
            raise permission_refused(uri, status, f"opening experiment {experiment!r}") from None
        raise StoreUnreachable(f"MLflow server at {uri} failed to open experiment {experiment!r} ({failure_reason(exc)})") from None
    return client, exp_id


def _tag_kind(client: MlflowClient, exp: Any, exp_id: str) -> None:
    """Tag experiments made before the kind tag, or by the UI, with it."""
    if exp is not None and exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        set_experiment_tag(client, exp_id, *EXPERIMENT_KIND)


def set_experiment_tag(client: MlflowClient, exp_id: str, key: str, value: str) -> None:
    """`client.set_experiment_tag`, once more when another stage set the same tag at the same moment."""
    once_more_if_raced(lambda: client.set_experiment_tag(exp_id, key, value))


def once_more_if_raced(write: Callable[[], T]) -> T:
    """`write()`, a write that MLflow's SQL store does by looking for a row, then inserting it; once more when
    another process inserted the same row at the same moment.

    Stages of queued experiments run together: two saving the same runs-table view (an experiment
    tag), or logging the same data file as a dataset, and the second failed on the table's unique key
    (seen in clean-clone runs: its run went to the spool). The row exists then, so the second
    call finds it.
    """
    try:
        return write()
    except OUTAGE as exc:
        if "unique constraint" not in str(exc).lower():
            raise
        return write()


def permission_status(exc: BaseException) -> int | None:
    """401 or 403 when the server refused this user (not an outage: a stage stops, sync keeps the spool), else None."""
    if isinstance(exc, PermissionRefused):
        return exc.status
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
    elif isinstance(exc, requests.HTTPError) and exc.response is not None:  # artifact uploads
        status = exc.response.status_code
    else:
        return None
    return status if status in (401, 403) else None


def permission_refused(uri: str, status: int, doing: str, on: str = "the experiment") -> PermissionRefused:
    """One line for a server that answers but refuses this user: credentials or the user's permissions (`on` what)."""
    who = creds[0] if (creds := credentials(uri)) else None
    if status == 401:
        hint = (f"the server did not accept user {who!r}: check the password (MLFLOW_TRACKING_PASSWORD, or the one "
                "in MLFLOW_TRACKING_URI)" if who
                else "the server requires a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    else:
        hint = (f"user {who or '(anonymous)'!r} may not write here: ask an admin for EDIT permission on {on}, "
                "or log in as a user who has it")
    return PermissionRefused(
        f"MLflow server at {uri} answered HTTP {status} when {doing}: a permission problem (not an outage); {hint}", status
    )


_HTTP_STATUS = re.compile(r"too many (\d{3}) error responses|error code (\d{3})|HTTP (\d{3})|(\d{3}) Server Error")


def failure_reason(exc: BaseException | str) -> str:
    """The cause of a store failure in a few words (MLflow's own messages run to many lines)."""
    text = redact(str(exc))  # MLflow's messages name the URL it asked, userinfo and all
    for cause in ("Connection refused", "Connection aborted", "Connection reset", "readonly database", "database is locked", "disk I/O error",
                  "No space left on device", "database or disk is full", "file is not a database", "Read timed out", "RemoteDisconnected"):
        if cause in text:
            return cause
    if found := _HTTP_STATUS.search(text):
        return f"HTTP {next(g for g in found.groups() if g)}"
    first = first_line(text, type(exc).__name__)
    return first[:160]


def now_ms() -> int:
    """The time as MLflow stores it (milliseconds since the epoch)."""
    return int(time.time() * 1000)
