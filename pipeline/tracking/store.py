"""Where runs go, and opening it: URI, workspace root, health check, SQLite checks, the experiment, backup, lock.

Where runs go is decided once, here: `MLFLOW_TRACKING_URI` when set (a team
server), else `mlflow.db` and `mlartifacts/` at the workspace root. The root is
DVC's `DVC_ROOT` when DVC runs the stage, which for queued experiments is the
real workspace rather than the temp copy they run in, so no run is lost with it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import requests
import sqlalchemy.exc
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import PipelineError

# A new store announces its table creation at INFO on every first run; stages keep stderr for problems.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
CHECK_TIMEOUT = 5.0  # seconds pre-flight waits for a locked SQLite store
BATCH = 1000  # MLflow's limit on metrics per log_batch call
PARAM_BATCH = 100  # ... and on params


class TrackingError(PipelineError):
    """The tracking store cannot be used; the message names the URI and the cause."""


class StoreUnreachable(TrackingError):
    """The tracking server does not answer (an outage, not a refusal)."""


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


def _check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes of retries, when a tracking server is down."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as resp:
            if resp.status != 200:
                raise StoreUnreachable(f"MLflow server at {uri} answered /health with HTTP {resp.status}")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StoreUnreachable(
            f"MLflow tracking server at {uri} is not reachable ({reason}); start it, "
            "or unset MLFLOW_TRACKING_URI to use the local store"
        ) from None


def use_server(uri: str) -> None:
    """Bound MLflow's HTTP retries (minutes by default), then check the server answers (once per process).

    A stage's pre-flight and its run both come here; the second finds the answer
    and asks no more. A server that fails after that is an outage of the run: spooled.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    if uri not in _answered:
        _check_server(uri)
        _answered.add(uri)


def is_sqlite(uri: str) -> bool:
    """True for an embedded SQLite store (a file; `sqlite:///path`)."""
    return uri.startswith("sqlite:///")


def sqlite_file(uri: str) -> Path:
    """The file behind a SQLite store URI."""
    return Path(uri.removeprefix("sqlite:///"))


def preflight() -> str:
    """Check the store can be read and written before a stage does expensive work; return its URI.

    A server that is down fails here in seconds (not after minutes of MLflow's
    retries, and not after the data was generated or the model trained); a SQLite
    store that is missing its folder, damaged, locked, read-only or of another
    schema fails with the file and what to do, instead of a traceback after the work.
    """
    uri = tracking_uri()
    if is_server(uri):
        use_server(uri)
    elif is_sqlite(uri):
        path = sqlite_file(uri)
        if not path.parent.is_dir():
            raise TrackingError(f"MLflow store {uri}: folder {path.parent} does not exist; create it or fix MLFLOW_TRACKING_URI")
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
        check_sqlite_store(path)
    return MlflowClient(uri)


def _schema_head() -> str:
    """The schema this MLflow writes. No public API names it: this is the one private MLflow call left."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


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
def store_lock(root: Path) -> Iterator[None]:
    """Serialise store creation (concurrent first-time SQLite migrations crash) and registry promotions."""
    with open(root / f"{STORE_FILE}.lock", "a") as fh:
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
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def connect(experiment: str) -> tuple[MlflowClient, str]:
    """Open the store (creating it and the experiment once, safely); return (client, experiment id)."""
    root = workspace_root()
    uri = tracking_uri(root)
    if is_server(uri):
        use_server(uri)  # a no-op after the stage's pre-flight: one /health check per stage
    point_fluent_api_at(uri)
    if is_sqlite(uri):
        with store_lock(root):
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(
                experiment, artifact_location=(root / ARTIFACT_DIR).as_uri(), tags=dict([EXPERIMENT_KIND])
            )
    else:
        client = MlflowClient(uri)
        try:
            exp = client.get_experiment_by_name(experiment)
            try:
                exp_id = exp.experiment_id if exp else client.create_experiment(experiment, tags=dict([EXPERIMENT_KIND]))
            except MlflowException:  # another stage created it first: no file lock reaches a server
                exp = client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        except MlflowException as exc:
            raise TrackingError(refusal(uri, exc)) from None
    if exp is not None and exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)  # experiments made before the tag, or by the UI
    return client, exp_id


def refusal(uri: str, exc: MlflowException) -> str:
    """One line for a server that answers but refuses: credentials are the usual cause."""
    status = exc.get_http_status_code()
    if status in (401, 403):
        who = os.environ.get("MLFLOW_TRACKING_USERNAME")
        hint = (
            f"the server refused user {who!r}: check MLFLOW_TRACKING_PASSWORD, and that the user may write here"
            if who else "the server requires a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
        return f"MLflow server at {uri} answered HTTP {status}; {hint}"
    return f"MLflow server at {uri} refused the request: {exc.message.splitlines()[0]}"


def failure_reason(exc: BaseException | str) -> str:
    """The cause of a store failure in a few words (MLflow's own messages run to many lines)."""
    text = str(exc)
    for cause in ("Connection refused", "Connection aborted", "Connection reset", "readonly database", "database is locked", "disk I/O error",
                  "No space left on device", "file is not a database", "Read timed out"):
        if cause in text:
            return cause
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:160]


def now_ms() -> int:
    """The time as MLflow stores it (milliseconds since the epoch)."""
    return int(time.time() * 1000)
