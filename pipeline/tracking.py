"""The one module that talks to MLflow (and reads the environment for it).

Where runs go is decided once, here: `MLFLOW_TRACKING_URI` when set (a team
server), else `mlflow.db` and `mlartifacts/` at the workspace root. The root is
DVC's `DVC_ROOT` when DVC runs the stage, which for queued experiments is the
real workspace rather than the temp copy they run in, so no run is lost with it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import PipelineError

STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
BATCH = 1000  # MLflow's limit on metrics per log_batch call
PARAM_BATCH = 100  # ... and on params


class TrackingError(PipelineError):
    """The tracking store cannot be used; the message names the URI and the cause."""


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
                raise TrackingError(f"MLflow server at {uri} answered /health with HTTP {resp.status}")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"MLflow tracking server at {uri} is not reachable ({reason}); start it, "
            "or unset MLFLOW_TRACKING_URI to use the local store"
        ) from None


def _use_server(uri: str) -> None:
    """Bound MLflow's HTTP retries (minutes by default), then check the server answers."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    _check_server(uri)


def preflight() -> str:
    """Check the store can be used before a stage does expensive work; return its URI.

    A server that is down fails here in seconds (not after minutes of MLflow's
    retries, and not after the data was generated or the model trained); a SQLite
    store whose folder does not exist fails with the path instead of a traceback.
    """
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        _use_server(uri)
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise TrackingError(f"MLflow store {uri}: folder {folder} does not exist; create it or fix MLFLOW_TRACKING_URI")
    return uri


@contextmanager
def _store_lock(root: Path) -> Iterator[None]:
    """Serialise store creation: concurrent first-time SQLite migrations crash."""
    with open(root / f"{STORE_FILE}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def connect(experiment: str) -> tuple[MlflowClient, str]:
    """Open the store (creating it and the experiment once, safely); return (client, experiment id)."""
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
                experiment, artifact_location=(root / ARTIFACT_DIR).as_uri()
            )
    else:
        client = MlflowClient(uri)
        try:
            exp = client.get_experiment_by_name(experiment)
            try:
                exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
            except MlflowException:  # another stage created it first: no file lock reaches a server
                exp = client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        except MlflowException as exc:
            raise TrackingError(_refusal(uri, exc)) from None
    return client, exp_id


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


def pipeline_id(commit: str) -> str:
    """The `pipeline` tag: one value per pipeline execution, shared by all its stage runs.

    Stages are separate processes, so the id is derived from what they share:
    under `dvc exp run` (queued or not) DVC names the execution, and the name plus
    its baseline commit is unique (`sweet-tuna@1a2b3c4`). A plain `dvc repro` has
    no name, so its id is the commit plus a hash of the uncommitted changes
    (`repro@1a2b3c4+9f8e7d6c`): editing params.yaml or code starts a new group,
    re-running the same state adds to the same one.
    """
    if name := os.environ.get("DVC_EXP_NAME"):
        baseline = os.environ.get("DVC_EXP_BASELINE_REV") or commit
        return f"{name}@{baseline[:7]}"
    dirty = _uncommitted_digest()
    return f"repro@{commit[:7]}" + (f"+{dirty}" if dirty else "")


def context_tags() -> dict[str, str]:
    """Tags every run carries: git commit, pipeline execution and, under `dvc exp`, name and baseline."""
    tags = {"git.commit": _git_commit()}
    tags["mlflow.source.git.commit"] = tags["git.commit"]
    tags["pipeline"] = pipeline_id(tags["git.commit"])
    for env, tag in (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev")):
        if value := os.environ.get(env):
            tags[tag] = value
    return tags


class StageRun:
    """One stage execution = one MLflow run; metrics are buffered and written in batches."""

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self._metrics: list[Metric] = []

    def log_params(self, params: dict[str, Any]) -> None:
        """Log flat params (values stringified as MLflow stores them)."""
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + PARAM_BATCH], synchronous=True)

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

    def flush(self) -> None:
        """Write buffered metrics in as few calls as MLflow allows."""
        pending, self._metrics = self._metrics, []
        for i in range(0, len(pending), BATCH):
            self.client.log_batch(self.run_id, metrics=pending[i : i + BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or folder into the run's artifacts."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, payload: dict[str, Any], artifact_file: str) -> None:
        """Store a dict as a JSON artifact."""
        self.client.log_dict(self.run_id, payload, artifact_file)

    def log_dataset(self, path: str | Path, name: str, digest: str, context: str, rows: int) -> None:
        """Record a data file as an MLflow dataset input; its digest is the file's content hash."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        dataset = MetaDataset(LocalArtifactDatasetSource(str(Path(path).resolve())), name=name, digest=digest)
        entity = dataset._to_mlflow_entity()
        tags = [InputTag("mlflow.data.context", context), InputTag("rows", str(rows))]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(entity, tags)])

    def log_torch_model(self, model: Any, input_example: np.ndarray, requirements: list[str]) -> str:
        """Log a PyTorch model (pt2 export: no pickle) with signature and input example; return its URI."""
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        model = model.to("cpu").eval()
        with torch.no_grad():
            output = model(torch.from_numpy(input_example)).numpy()
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=infer_signature(input_example, output),
            input_example=input_example,
            pip_requirements=requirements,
            serialization_format="pt2",
        )
        return info.model_uri


def _now_ms() -> int:
    return int(time.time() * 1000)


@contextmanager
def stage_run(stage: str, experiment: str, run_name: str, tags: dict[str, str]) -> Iterator[StageRun]:
    """Start a run for a stage; end it FINISHED, FAILED, or KILLED (Ctrl-C / SIGTERM)."""
    client, exp_id = connect(experiment)
    all_tags = {"stage": stage, **context_tags(), **tags}
    run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=all_tags)
    tracked = StageRun(client, run.info.run_id, exp_id)
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
        try:
            tracked.flush()
        finally:
            mlflow.end_run(status)


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


def link_generate_run(run: StageRun, data_digest: str) -> str | None:
    """Tag `run` with the generate run that produced its data (same data.digest); return its id.

    When generate was restored from DVC's run cache, that is the earlier run
    which made the identical files; when no run made them (data pulled from a
    remote into a fresh store), no tag is set.
    """
    found = latest_run(run.client, run.experiment_id, {"stage": "generate", "data.digest": data_digest})
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
    return MlflowClient(uri)


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
