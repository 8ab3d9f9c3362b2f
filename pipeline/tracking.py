"""The one module that talks to MLflow (and reads the environment for it).

Where runs go is decided once, here: `MLFLOW_TRACKING_URI` when set (a team
server), else `mlflow.db` and `mlartifacts/` at the workspace root. The root is
DVC's `DVC_ROOT` when DVC runs the stage, which for queued experiments is the
real workspace rather than the temp copy they run in, so no run is lost with it.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
import requests
import sqlalchemy.exc
import yaml
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import PipelineError

# A new store announces its table creation at INFO on every first run; stages keep stderr for problems.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
# MLflow 3's experiment kind (values: the UI bundle's experiment kinds; its "experiment type" switch
# writes this tag). The 3.17 UI lets the browser's GenAI / Model training toggle decide instead, so
# links add `?workflowType=machine_learning` (docs/mlflow-ui.md); the tag keeps other readers right.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# The UI's "Share" button stores a runs-table view as an experiment tag with this prefix; the page
# #/experiments/<id>/runs?workflowType=machine_learning&viewStateShareKey=<key> opens it.
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
BATCH = 1000  # MLflow's limit on metrics per log_batch call
PARAM_BATCH = 100  # ... and on params
SPOOL_DIR = ".mlflow-spool"  # runs kept locally while the store was down; `./tasks.sh sync` replays them
CHECK_TIMEOUT = 5.0  # seconds pre-flight waits for a locked SQLite store


class TrackingError(PipelineError):
    """The tracking store cannot be used; the message names the URI and the cause."""


class StoreUnreachable(TrackingError):
    """The tracking server does not answer (an outage, not a refusal)."""


# What a store or server that fails mid-run raises: the run is then spooled, not lost.
OUTAGE = (MlflowException, OSError, requests.RequestException, sqlalchemy.exc.SQLAlchemyError, StoreUnreachable)


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


def _use_server(uri: str) -> None:
    """Bound MLflow's HTTP retries (minutes by default), then check the server answers."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    _check_server(uri)


def preflight() -> str:
    """Check the store can be read and written before a stage does expensive work; return its URI.

    A server that is down fails here in seconds (not after minutes of MLflow's
    retries, and not after the data was generated or the model trained); a SQLite
    store that is missing its folder, damaged, locked, read-only or of another
    schema fails with the file and what to do, instead of a traceback after the work.
    """
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        _use_server(uri)
    elif uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.parent.is_dir():
            raise TrackingError(f"MLflow store {uri}: folder {path.parent} does not exist; create it or fix MLFLOW_TRACKING_URI")
        check_sqlite_store(path)
    return uri


def _schema_head() -> str:
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


def backup_path(uri: str) -> Path | None:
    """The SQLite file behind `uri` (what `backup_store` copies), None for a server."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextmanager
def _store_lock(root: Path) -> Iterator[None]:
    """Serialise store creation: concurrent first-time SQLite migrations crash."""
    with open(root / f"{STORE_FILE}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def connect(experiment: str, found_by: str | None = None) -> tuple[MlflowClient, str]:
    """Open the store (creating it and the experiment once, safely); return (client, experiment id).

    With `found_by` (the stage starting), runs of this host whose process died are closed first.
    """
    root = workspace_root()
    uri = tracking_uri(root)
    if uri.startswith(("http://", "https://")):
        _use_server(uri)
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        with _store_lock(root):
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(
                experiment, artifact_location=(root / ARTIFACT_DIR).as_uri(), tags=dict([EXPERIMENT_KIND])
            )
            if found_by:
                close_zombies(client, [exp_id], found_by)
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
            raise TrackingError(_refusal(uri, exc)) from None
        if found_by:
            close_zombies(client, [exp_id], found_by)
    if exp is not None and exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)  # experiments made before the tag, or by the UI
    return client, exp_id


def _process_started(pid: int) -> str | None:
    """When process `pid` started ('<boot id>:<clock ticks after boot>'), None if it is gone; pid reuse gives a new value."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        if sys.platform.startswith("linux"):
            return None
        try:  # no /proc: whether the pid exists is all there is
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "alive"
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"


def process_tags() -> dict[str, str]:
    """Host, pid and process start of this stage: how a later stage tells that its run was orphaned."""
    return {
        "process.host": socket.gethostname(),
        "process.pid": str(os.getpid()),
        "process.started": _process_started(os.getpid()) or "unknown",
    }


def close_zombies(client: MlflowClient, experiment_ids: list[str], found_by: str) -> int:
    """Close RUNNING runs of this host whose process is gone, as KILLED with a `closed.reason` tag; return how many.

    Runs waiting in the spool for `./tasks.sh sync` are left for it. The SQLite
    store is backed up first when there is anything to close.
    """
    host = socket.gethostname().replace("'", "")
    found = client.search_runs(
        experiment_ids, filter_string=f"attributes.status = 'RUNNING' and tags.`process.host` = '{host}'", max_results=1000,
    )
    pending = set(spooled_run_ids())
    dead = [
        r for r in found
        if r.info.run_id not in pending and r.data.tags.get("process.pid", "").isdigit()
        and _process_started(int(r.data.tags["process.pid"])) != r.data.tags.get("process.started")
    ]
    if dead and (path := backup_path(client.tracking_uri)):
        backup_store(path)
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    for r in dead:
        reason = (
            f"process {r.data.tags['process.pid']} on {host} was gone when {found_by} (pid {os.getpid()}) "
            f"started at {now}; killed without cleanup (SIGKILL, out of memory, power loss)"
        )
        client.set_tag(r.info.run_id, "closed.reason", reason)
        client.set_terminated(r.info.run_id, RunStatus.to_string(RunStatus.KILLED))
    return len(dead)


def _refusal(uri: str, exc: MlflowException) -> str:
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


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _uncommitted_digest() -> str | None:
    """Short hash of uncommitted changes to tracked files (params, code), None when clean.

    dvc.lock and .gitignore files are left out: DVC rewrites them while the
    pipeline runs, and every stage of one execution must get the same answer.
    """
    cmd = ["git", "diff", "HEAD", "--binary", "--", ".", ":(exclude)dvc.lock", ":(exclude,glob)**/.gitignore"]
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=30)
    except OSError:
        return None
    if out.returncode != 0 or not out.stdout:
        return None
    return hashlib.md5(out.stdout).hexdigest()[:8]


def started_by_hand() -> bool:
    """True when a person ran the stage (`python -m stages.train mlp`), not DVC (which sets DVC_ROOT)."""
    return "DVC_ROOT" not in os.environ


def pipeline_id(commit: str) -> str:
    """The `pipeline` tag: one value per pipeline execution, shared by all its stage runs.

    Stages are separate processes, so the id is derived from what they share:
    under `dvc exp run` (queued or not) DVC names the execution, and the name plus
    its baseline commit is unique (`sweet-tuna@1a2b3c4`). A plain `dvc repro` has
    no name, so its id is the commit plus a hash of the uncommitted changes
    (`repro@1a2b3c4+9f8e7d6c`): editing params.yaml or code starts a new group,
    re-running the same state adds to the same one. A stage run by hand is
    `hand@1a2b3c4+…`, so it never joins a DVC execution's group.
    """
    if name := os.environ.get("DVC_EXP_NAME"):
        baseline = os.environ.get("DVC_EXP_BASELINE_REV") or commit
        return f"{name}@{baseline[:7]}"
    dirty = _uncommitted_digest()
    kind = "hand" if started_by_hand() else "repro"
    return f"{kind}@{commit[:7]}" + (f"+{dirty}" if dirty else "")


def context_tags() -> dict[str, str]:
    """Tags every run carries: git commit, pipeline execution and, under `dvc exp`, name and baseline."""
    tags = {"git.commit": _git_commit()}
    tags["mlflow.source.git.commit"] = tags["git.commit"]
    tags["pipeline"] = pipeline_id(tags["git.commit"])
    tags["started_by"] = "hand" if started_by_hand() else "dvc"
    for env, tag in (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev")):
        if value := os.environ.get(env):
            tags[tag] = value
    return tags


F = TypeVar("F", bound=Callable[..., Any])


def _spooling(method: F) -> F:
    """Run a StageRun method against the store; when the store fails, move the run to the spool and run it there."""

    @functools.wraps(method)
    def call(self: StageRun, *args: Any, **kwargs: Any) -> Any:
        if self.spool is None:
            try:
                return method(self, *args, **kwargs)
            except OUTAGE as exc:
                self.start_spool(exc)
        return method(self, *args, **kwargs)

    return call  # type: ignore[return-value]


class StageRun:
    """One stage execution = one MLflow run; metrics are buffered and written in batches.

    If the store or server fails after the run began, everything from then on
    (and the run itself, when it could not be created) goes to a local MLflow
    store under .mlflow-spool/, through the same calls; `./tasks.sh sync` replays it.
    """

    def __init__(self, client: MlflowClient | None, run_id: str | None, experiment_id: str | None,
                 experiment: str = "", run_name: str = "", tags: dict[str, str] | None = None,
                 model: str = "model") -> None:
        self.client = client  # type: ignore[assignment]
        self.run_id = run_id  # type: ignore[assignment]
        self.experiment_id = experiment_id  # type: ignore[assignment]
        self.model = model  # the name its logged model gets: mlp, linear, linear_gd
        self._metrics: list[Metric] = []
        self.experiment, self.run_name, self.tags = experiment, run_name, dict(tags or {})
        self.start_time = _now_ms()
        self.spool: Path | None = None
        self.spool_reason = ""

    def start_spool(self, exc: BaseException) -> None:
        """Keep the rest of this run in a new local store under .mlflow-spool/ (same start time, tags, name)."""
        stage = self.tags.get("stage", "run").replace("@", "-")
        folder = workspace_root() / SPOOL_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{stage}-{os.getpid()}"
        folder.mkdir(parents=True)
        uri = f"sqlite:///{folder / 'spool.db'}"
        client = MlflowClient(uri)
        exp_id = client.create_experiment(self.experiment, artifact_location=(folder / "artifacts").as_uri())
        run = client.create_run(exp_id, start_time=self.start_time, tags=self.tags, run_name=self.run_name)
        meta = {"run_id": self.run_id, "experiment": self.experiment, "stage": self.tags.get("stage"),
                "store": tracking_uri(), "reason": _reason(exc)}
        (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        mlflow.set_tracking_uri(uri)  # mlflow's own log_model goes to the active run: make that the spool's
        with suppress(Exception):
            mlflow.end_run()  # drops the store's run from the active stack (ending it there fails: it is not in the spool)
        mlflow.start_run(run_id=run.info.run_id)
        self.client, self.run_id, self.experiment_id, self.spool = client, run.info.run_id, exp_id, folder
        self.spool_reason = meta["reason"]

    def finish(self, status: str) -> None:
        """Write buffered metrics and end the run with `status` (in the spool if the store failed)."""
        try:
            self.flush()
        finally:
            if self.spool is None:
                try:
                    mlflow.end_run(status)
                except OUTAGE as exc:
                    self.start_spool(exc)
            if self.spool is not None:
                mlflow.end_run(status)
                print(
                    f"{self.tags.get('stage')}: the MLflow store failed during the run ({self.spool_reason}); "
                    f"the run ({status}) is kept in {self.spool.relative_to(workspace_root())}; "
                    "run `./tasks.sh sync` once the store is back",
                    file=sys.stderr,
                )

    @_spooling
    def find_run(self, tags: dict[str, str]) -> str | None:
        """The newest finished run in this run's experiment with all of `tags` (none while spooling)."""
        return latest_run(self.client, self.experiment_id, tags)

    @_spooling
    def log_params(self, params: dict[str, Any]) -> None:
        """Log flat params (values stringified as MLflow stores them)."""
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + PARAM_BATCH], synchronous=True)

    @_spooling
    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set several tags in one call."""
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Buffer summary metrics; they are written on flush."""
        ts = _now_ms()
        self._metrics += [Metric(k, float(v), ts, step) for k, v in metrics.items()]

    def log_curve(self, key: str, steps: Sequence[int], values: Sequence[float]) -> None:
        """Buffer a whole curve (one point per step)."""
        ts = _now_ms()
        self._metrics += [Metric(key, float(v), ts, int(s)) for s, v in zip(steps, values)]

    @_spooling
    def flush(self) -> None:
        """Write buffered metrics in as few calls as MLflow allows."""
        pending, self._metrics = self._metrics, []
        for i in range(0, len(pending), BATCH):
            self.client.log_batch(self.run_id, metrics=pending[i : i + BATCH])

    @_spooling
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or folder into the run's artifacts."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    @_spooling
    def save_view(self, key: str, filter_string: str, params: Sequence[str], metrics: Sequence[str]) -> None:
        """Store a runs-table view (filter, columns, best first by the first metric) as the UI's Share button does.

        The tag is rewritten by every call, so the view follows the params as they are added.
        """
        columns = [f"params.`{p}`" for p in params] + [f"metrics.`{m}`" for m in metrics]
        state = {
            "searchFilter": filter_string, "orderByKey": columns[len(params)], "orderByAsc": True,
            "selectedColumns": ["tags.`pipeline`", *columns],
        }
        self.client.set_experiment_tag(self.experiment_id, VIEW_TAG_PREFIX + key, json.dumps(state))

    @_spooling
    def log_dict(self, payload: dict[str, Any], artifact_file: str) -> None:
        """Store a dict as a JSON artifact."""
        self.client.log_dict(self.run_id, payload, artifact_file)

    @_spooling
    def log_dataset(self, path: str | Path, name: str, digest: str, context: str, rows: int) -> None:
        """Record a data file as an MLflow dataset input; its digest is the file's content hash."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        dataset = MetaDataset(LocalArtifactDatasetSource(str(Path(path).resolve())), name=name, digest=digest)
        entity = dataset._to_mlflow_entity()
        tags = [InputTag("mlflow.data.context", context), InputTag("rows", str(rows))]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(entity, tags)])

    @_spooling
    def log_torch_model(self, model: Any, input_example: np.ndarray, requirements: list[str]) -> str:
        """Log a PyTorch model (pt2 export: no pickle) with signature and input example; return its URI.

        The export holds CPU weights, and its pyfunc flavor is pinned to the CPU
        (`model_config: {device: cpu}` in MLmodel), so `mlflow.pyfunc.load_model`
        and `mlflow models serve` work on hosts with and without CUDA; left
        unset, pyfunc picks CUDA wherever it exists and cannot move a pt2 export.
        """
        import torch
        from mlflow.models import Model, infer_signature

        model = model.to("cpu").eval()
        with torch.no_grad():
            output = model(torch.from_numpy(input_example)).numpy()
        with warnings.catch_warnings():
            # torch.export.load reads the archive through a read-only buffer and says so, harmlessly,
            # when MLflow loads the model back to check the input example.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            info = Model.log(
                artifact_path=None,
                name=self.model,
                flavor=_PytorchOnCpu,
                flavor_name="mlflow.pytorch",
                pytorch_model=model,
                signature=infer_signature(input_example, output),
                input_example=input_example,
                pip_requirements=requirements,
                serialization_format="pt2",
            )
        return info.model_uri


class _PytorchOnCpu:
    """mlflow.pytorch's flavor, saved with its pyfunc device pinned to the CPU (see log_torch_model)."""

    @staticmethod
    def save_model(path: str, mlflow_model: Any, **kwargs: Any) -> None:
        """mlflow.pytorch.save_model, then `device: cpu` in the MLmodel's python_function model_config."""
        import mlflow.pytorch
        from mlflow.models.model import MLMODEL_FILE_NAME
        from mlflow.pyfunc import FLAVOR_NAME, MODEL_CONFIG

        mlflow.pytorch.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        mlflow_model.flavors[FLAVOR_NAME][MODEL_CONFIG] = {"device": "cpu"}
        mlflow_model.save(str(Path(path) / MLMODEL_FILE_NAME))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _reason(exc: BaseException | str) -> str:
    """The cause of a store failure in a few words (MLflow's own messages run to many lines)."""
    text = str(exc)
    for cause in ("Connection refused", "readonly database", "database is locked", "disk I/O error",
                  "No space left on device", "file is not a database", "Read timed out"):
        if cause in text:
            return cause
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:160]


@contextmanager
def stage_run(stage: str, experiment: str, run_name: str, tags: dict[str, str]) -> Iterator[StageRun]:
    """Start a run for a stage; end it FINISHED, FAILED, or KILLED (Ctrl-C / SIGTERM).

    Runs of this host left RUNNING by a process that died are closed first. A
    store that fails from here on does not fail the stage: the run is spooled.
    """
    all_tags = {"stage": stage, **context_tags(), **process_tags(), **tags}
    tracked = StageRun(None, None, None, experiment, run_name, all_tags, all_tags.get("model", "model"))
    try:
        client, exp_id = connect(experiment, found_by=stage)
        run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=all_tags)
        tracked.client, tracked.run_id, tracked.experiment_id = client, run.info.run_id, exp_id
        tracked.start_time = run.info.start_time
    except OUTAGE as exc:
        tracked.start_spool(exc)
    status = RunStatus.to_string(RunStatus.FINISHED)
    try:
        yield tracked
    except (KeyboardInterrupt, SystemExit):
        status = RunStatus.to_string(RunStatus.KILLED)
        raise
    except BaseException:
        status = RunStatus.to_string(RunStatus.FAILED)
        raise
    finally:
        tracked.finish(status)
        if all_tags["started_by"] == "hand":  # DVC's log names the stage; a person needs to find the run
            print(f"{stage}: run by hand (tag started_by=hand), MLflow run {tracked.run_id} ({status}) in "
                  f"experiment {experiment!r} at {tracking_uri()}", file=sys.stderr)


def latest_run(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> str | None:
    """The newest finished run whose tags match all of `tags` (lineage look-ups)."""
    clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    clauses.append("attributes.status = 'FINISHED'")
    runs = client.search_runs(
        [experiment_id], filter_string=" and ".join(clauses), order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0].info.run_id if runs else None


def log_metrics_to(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> None:
    """Add metrics to another (finished) run, e.g. test scores beside their training run."""
    ts = _now_ms()
    client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()])


def log_artifact_to(client: MlflowClient, run_id: str, path: str | Path, artifact_path: str) -> None:
    """Add a file to another (finished) run, e.g. the predicted-vs-actual picture beside its training run."""
    client.log_artifact(run_id, str(path), artifact_path)


def link_generate_run(run: StageRun, data_digest: str) -> str | None:
    """Tag `run` with the generate run that produced its data (same data.digest); return its id.

    When generate was restored from DVC's run cache, that is the earlier run
    which made the identical files; when no run made them (data pulled from a
    remote into a fresh store), no tag is set.
    """
    found = run.find_run({"stage": "generate", "data.digest": data_digest})
    if found:
        run.set_tags({"generate.run_id": found})
    return found


def _open_existing(uri: str) -> MlflowClient:
    """A client for a store that must already exist: reading never creates an empty SQLite file."""
    if uri.startswith(("http://", "https://")):
        _use_server(uri)
    elif uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.exists():
            raise TrackingError(f"no MLflow store at {path}; run `dvc repro` first, or set MLFLOW_TRACKING_URI")
        check_sqlite_store(path)
    return MlflowClient(uri)


def close_stale_runs(experiment: str, found_by: str) -> tuple[int, int]:
    """Close this host's orphaned runs in `experiment`; return (closed now, still RUNNING elsewhere or live)."""
    client = _open_existing(tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return 0, 0
    closed = close_zombies(client, [exp.experiment_id], found_by)
    running = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    return closed, len(running)


def stage_runs(experiment: str, stage_prefix: str = "train@", max_runs: int = 10000) -> list[dict[str, Any]]:
    """Finished runs of the stages starting with `stage_prefix`, newest first, as plain dicts.

    Each row: run_id, run_name, experiment_id, start_time and end_time (ms),
    params, metrics (latest values) and tags. Used by `python -m pipeline.compare`.
    """
    uri = tracking_uri()
    client = _open_existing(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise TrackingError(f"no MLflow experiment {experiment!r} at {uri}; experiments there: {', '.join(names) or 'none'}")
    filter_string = f"tags.stage LIKE '{stage_prefix}%' and attributes.status = 'FINISHED'"
    rows: list[dict[str, Any]] = []
    token = None
    while len(rows) < max_runs:
        page = client.search_runs(
            [exp.experiment_id], filter_string=filter_string, order_by=["attributes.start_time DESC"],
            max_results=min(1000, max_runs - len(rows)), page_token=token,
        )
        rows += [
            {
                "run_id": r.info.run_id, "run_name": r.info.run_name, "experiment_id": r.info.experiment_id,
                "start_time": r.info.start_time, "end_time": r.info.end_time,
                "params": dict(r.data.params), "metrics": dict(r.data.metrics), "tags": dict(r.data.tags),
            }
            for r in page
        ]
        token = page.token
        if not token:
            break
    return rows


def _spool_folders(root: Path | None = None) -> list[Path]:
    """Spooled runs, oldest first."""
    return sorted(p.parent for p in ((root or workspace_root()) / SPOOL_DIR).glob("*/meta.json"))


def spooled_run_ids() -> list[str]:
    """Store run ids that have the rest of their logging waiting in the spool (the zombie check skips them)."""
    ids = []
    for folder in _spool_folders():
        with suppress(OSError, ValueError):
            if run_id := json.loads((folder / "meta.json").read_text()).get("run_id"):
                ids.append(run_id)
    return ids


def _local_dir(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path))


def _copy_logged_models(src: MlflowClient, src_run: Any, dest: MlflowClient, run_id: str, exp_id: str) -> int:
    """Re-create the spooled run's logged models (artifacts, MLmodel ids rewritten) in the store; return how many."""
    models = [m for m in src.search_logged_models([src_run.info.experiment_id]) if m.source_run_id == src_run.info.run_id]
    for m in models:
        new = dest.create_logged_model(exp_id, name=m.name, source_run_id=run_id, tags=m.tags, params=m.params,
                                       model_type=m.model_type)
        with tempfile.TemporaryDirectory(prefix="spool-model-") as tmp:
            local = Path(tmp) / "model"
            shutil.copytree(_local_dir(m.artifact_location), local)
            if (mlmodel := local / "MLmodel").exists():
                spec = yaml.safe_load(mlmodel.read_text())
                spec.update(run_id=run_id, model_id=new.model_id)
                mlmodel.write_text(yaml.safe_dump(spec, sort_keys=False))
            dest.log_model_artifacts(new.model_id, str(local))
        dest.finalize_logged_model(new.model_id, LoggedModelStatus.READY)
        dest.log_outputs(run_id, [LoggedModelOutput(new.model_id, 0)])
    return len(models)


def _replay(folder: Path) -> str:
    """Copy one spooled run into the store (the same run when it was created there), then drop the spool folder."""
    meta = json.loads((folder / "meta.json").read_text())
    src = MlflowClient(f"sqlite:///{folder / 'spool.db'}")
    src_exp = src.get_experiment_by_name(meta["experiment"])
    (run,) = src.search_runs([src_exp.experiment_id])
    dest, exp_id = connect(meta["experiment"])
    run_id = meta.get("run_id")
    if run_id:
        try:
            dest.get_run(run_id)
        except MlflowException:  # the store was replaced since: the run comes back as a new one
            run_id = None
    if not run_id:
        run_id = dest.create_run(exp_id, start_time=run.info.start_time, tags=run.data.tags, run_name=run.info.run_name).info.run_id
    params = [Param(k, v) for k, v in run.data.params.items()]
    for i in range(0, len(params), PARAM_BATCH):
        dest.log_batch(run_id, params=params[i : i + PARAM_BATCH])
    metrics = [m for key in run.data.metrics for m in src.get_metric_history(run.info.run_id, key)]
    for i in range(0, len(metrics), BATCH):
        dest.log_batch(run_id, metrics=metrics[i : i + BATCH])
    tags = {k: v for k, v in run.data.tags.items() if k != "mlflow.loggedModels"} | {"spool.synced": folder.name}
    dest.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    if run.inputs and run.inputs.dataset_inputs:
        dest.log_inputs(run_id, datasets=run.inputs.dataset_inputs)
    artifacts = _local_dir(run.info.artifact_uri)
    if artifacts.is_dir() and any(artifacts.iterdir()):
        dest.log_artifacts(run_id, str(artifacts))
    n_models = _copy_logged_models(src, run, dest, run_id, exp_id)
    dest.set_terminated(run_id, run.info.status, end_time=run.info.end_time)
    shutil.rmtree(folder)
    return (
        f"{meta.get('stage')}: run {run_id} synced as {run.info.status} ({len(params)} params, {len(metrics)} metric "
        f"points, {n_models} model{'s' * (n_models != 1)}) from {SPOOL_DIR}/{folder.name}"
    )


def sync_spool() -> list[str]:
    """Replay every spooled run into the store (backed up first when it is the SQLite file); one line per run."""
    folders = _spool_folders()
    if not folders:
        return []
    uri = preflight()
    if path := backup_path(uri):
        backup_store(path)
    mlflow.set_tracking_uri(uri)
    lines = []
    for folder in folders:
        try:
            lines.append(_replay(folder))
        except OUTAGE as exc:
            raise TrackingError(
                f"{SPOOL_DIR}/{folder.name}: replay into {uri} failed ({_reason(exc)}); "
                f"synced {len(lines)} of {len(folders)}; run `./tasks.sh sync` again once the store works"
            ) from None
    return lines


REGISTERED_PREFIX = "regression-"  # registered model names: regression-linear_gd, regression-linear, regression-mlp
CHAMPION = "champion"


def registered_name(model: str) -> str:
    """The registry name of one of the pipeline's models."""
    return f"{REGISTERED_PREFIX}{model}"


def champion_uri(model: str) -> str:
    """`models:/regression-<model>@champion`, checked to exist in the store, so serving fails in one line."""
    uri = tracking_uri()
    client = _open_existing(uri)
    name = registered_name(model)
    try:
        client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        raise TrackingError(
            f"no {name}@{CHAMPION} in the model registry at {uri}; run `dvc repro` (evaluate registers the models)"
        ) from None
    return f"models:/{name}@{CHAMPION}"


def register_model(run: StageRun, model: str, train_run_id: str, test_mse: float, data_digest: str) -> str:
    """Register a training run's logged model (once per run) and promote it if it is better; return a report line.

    The alias `champion` moves to the new version only when its test MSE is lower
    than the current champion's on the same data digest: ties and worse results
    leave it, and a version trained on other data is reported, not compared. On the
    embedded store the read-compare-move is serialised with the store's file lock
    (queued experiments evaluate in parallel); a server offers no such lock.
    """
    client, name, uri = run.client, registered_name(model), tracking_uri()
    if run.spool is not None:  # the store is down: the registry is the store's, so this waits for a rerun
        return f"{name}: not registered (the MLflow store failed; this run is spooled in {run.spool})"
    with _store_lock(workspace_root()) if uri.startswith("sqlite:///") else nullcontext():
        version = _version_for_run(client, name, train_run_id, run.experiment_id, test_mse, data_digest)
        if version is None:
            return f"{name}: training run {train_run_id} logged no model; nothing registered"
        return f"{name} v{version.version}: {_promote(client, name, version, test_mse, data_digest)}"


def _version_for_run(
    client: MlflowClient, name: str, run_id: str, experiment_id: str, test_mse: float, data_digest: str,
) -> Any:
    """The registry version made from `run_id`'s logged model, created (with its scores as tags) when new."""
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        return existing[0]
    logged = client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'", max_results=1
    )
    if not logged:
        return None
    try:
        client.create_registered_model(name, description="Trained by the regression pipeline; alias champion = lowest test MSE")
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    tags = {"data.digest": data_digest, "test_mse": repr(float(test_mse))}
    return client.create_model_version(
        name, source=logged[0].model_uri, run_id=run_id, tags=tags, model_id=logged[0].model_id, await_creation_for=0,
    )


def _promote(client: MlflowClient, name: str, version: Any, test_mse: float, data_digest: str) -> str:
    """Move `champion` to `version` when it beats the current champion on the same data; say what happened."""
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    if champion is None:
        client.set_registered_model_alias(name, CHAMPION, version.version)
        return f"first {CHAMPION} (test_mse {test_mse:.6g})"
    if str(champion.version) == str(version.version):
        return f"already {CHAMPION} (test_mse {test_mse:.6g})"
    theirs = champion.tags.get("data.digest", "none")
    if theirs != data_digest or "test_mse" not in champion.tags:
        return (
            f"not compared: {CHAMPION} v{champion.version} was scored on other data "
            f"(data.digest {theirs[:8]}, this one {data_digest[:8]}); {CHAMPION} unchanged"
        )
    best = float(champion.tags["test_mse"])
    if test_mse < best:
        client.set_registered_model_alias(name, CHAMPION, version.version)
        return f"new {CHAMPION} (test_mse {test_mse:.6g} < {best:.6g} of v{champion.version})"
    return f"{CHAMPION} stays v{champion.version} (test_mse {best:.6g} <= {test_mse:.6g})"
