"""The model registry: each training run's logged model registered once, alias `champion` on the best test MSE."""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.tracking.store import TrackingError, open_existing, store_lock, tracking_uri, workspace_root

if TYPE_CHECKING:
    from pipeline.tracking.run import StageRun

REGISTERED_PREFIX = "regression-"  # registered model names: regression-linear_gd, regression-linear, regression-mlp
CHAMPION = "champion"


def registered_name(model: str) -> str:
    """The registry name of one of the pipeline's models."""
    return f"{REGISTERED_PREFIX}{model}"


def champion(model: str) -> tuple[str, str]:
    """`models:/regression-<model>@champion` and the version it names, checked to exist, so serving fails in one line."""
    uri = tracking_uri()
    client = open_existing(uri)
    name = registered_name(model)
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        raise TrackingError(
            f"no {name}@{CHAMPION} in the model registry at {uri}; run `dvc repro` (evaluate registers the models)"
        ) from None
    return f"models:/{name}@{CHAMPION}", str(version.version)


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
    with store_lock(workspace_root()) if uri.startswith("sqlite:///") else nullcontext():
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
