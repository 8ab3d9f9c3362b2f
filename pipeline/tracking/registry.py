"""Models in MLflow: the logged model, loading it back, registered versions and their `champion` alias.

The logged model is an MLflow "models from code" pyfunc: pyfunc_model.py (the model's
code), the stage's models/<name>.safetensors (artifact `weights`) and the few project
modules that rebuild the nn.Module from them (code/pipeline/). Nothing is pickled, and
logging imports neither torch nor a compiler: rebuilding from the spec in the weights file
needs no exported graph. `load_torch_module` gives a PyTorch user the
nn.Module back in one call. evaluate registers each training run's logged model once and
moves `champion` to the lowest validation MSE on the same data, safely under concurrency: the
test split stays for reporting (its MSE is tagged and printed beside), never for choosing.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.tracking.lineage import training_run

if TYPE_CHECKING:
    from torch import nn
from pipeline.tracking.store import (
    TrackingError, all_pages, environ_kept, is_sqlite, open_existing, permission_refused, permission_status, sqlite_file, store_lock, tracking_uri,
)

PACKAGE = Path(__file__).resolve().parents[1]  # pipeline/
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
# What pipeline.models.load_weights needs, shipped in the model as code/pipeline/ (tests/test_models.py loads a
# model with no checkout on the path, so a new import in models.py that is missing here fails there).
REBUILD_CODE = ("__init__.py", "errors.py", "files.py", "models.py")
REQUIREMENTS = ("torch", "safetensors", "numpy")


def log_torch_model(run_id: str, name: str, weights: str | Path, input_example: np.ndarray) -> str:
    """Log the weights file written by `pipeline.models.save_weights` to run `run_id` as logged model `name`.

    The signature is a float32 tensor [-1, d] -> [-1, 1] built from the example's width, so
    nothing is run; MLflow's input-example check (which loads the model back) is skipped.
    The run must be MLflow's active run (see run.py): `Model.log` files the logged model
    under the active run's experiment, and has no argument for it. Returns the model URI.
    """
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    example = np.asarray(input_example, dtype=np.float32)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, example.shape[1]))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1))]),
    )
    with tempfile.TemporaryDirectory() as tmp, _quietly():
        code = Path(tmp) / "pipeline"
        code.mkdir()
        for file in REBUILD_CODE:
            shutil.copy2(PACKAGE / file, code / file)
        info = Model.log(
            artifact_path=None,
            name=name,
            flavor=_PyfuncWithoutReload,
            flavor_name="pyfunc.ModelFromCode",
            run_id=run_id,
            python_model=str(MODEL_CODE),
            artifacts={"weights": str(weights)},
            code_paths=[str(code)],
            signature=signature,
            input_example=example,
            pip_requirements=[f"{p}=={installed_version(p).split('+')[0]}" for p in REQUIREMENTS],
            validate_serving_input=False,
        )
    return info.model_uri


@contextmanager
def _quietly() -> Iterator[None]:
    """Keep the stage's stderr to its own lines: no "Downloading artifacts" bar while MLflow copies the weights
    into the model, no INFO line for the example's check against the signature."""
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR as BARS

    logger = logging.getLogger("mlflow.pyfunc")
    level = logger.level
    with environ_kept(BARS.name):
        os.environ[BARS.name] = "false"
        logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            logger.setLevel(level)


class _PyfuncWithoutReload:
    """mlflow.pyfunc as a flavor for `Model.log`, which takes `validate_serving_input` and pyfunc does not."""

    @staticmethod
    def save_model(path: str, mlflow_model: Any, validate_serving_input: bool = True, **kwargs: Any) -> None:
        """mlflow.pyfunc.save_model; `validate_serving_input` is Model.log's switch for the load-back check.

        The model's config (`device`, the CPU by default) is written here rather than passed to `Model.log`:
        MLflow accepts a load-time `model_config` only for keys the logged model declares, and `Model.log`
        would also copy the config into the run's params, where `device` is the stage's own param.
        """
        import mlflow.pyfunc

        mlflow.pyfunc.save_model(path=path, mlflow_model=mlflow_model, model_config={"device": "cpu"}, **kwargs)


def load_torch_module(model_uri: str, device: str = "cpu") -> nn.Module:
    """The trained nn.Module (eval mode, on `device`) behind a logged model's URI, in one call.

    `model_uri` is what MLflow names a model by: `models:/regression-mlp@champion`,
    `models:/regression-mlp/3` or `models:/m-<id>` (a run's logged model), resolved in the
    pipeline's store (MLFLOW_TRACKING_URI, else the workspace's mlflow.db), or a local
    model folder. It goes through `mlflow.pyfunc.load_model`, the same rebuild that
    `mlflow models serve` runs.
    """
    import mlflow.artifacts
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    # MLflow resolves `models:/` names through the process-wide registry URI, whatever download_artifacts
    # is told: resolve them here with a client of the pipeline's store, and download what they name.
    uri = tracking_uri()
    location = model_uri
    if model_uri.startswith("models:/"):
        client = MlflowClient(uri, registry_uri=uri)
        path = model_uri.removeprefix("models:/").strip("/")
        if "@" in path or "/" in path:
            name, alias = path.split("@", 1) if "@" in path else (path, "")
            version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(*path.split("/", 1))
            path = version.model_id or version.source.removeprefix("models:/")
        location = client.get_logged_model(path).artifact_location
    local = mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=uri)
    pyfunc = mlflow.pyfunc.load_model(local)  # on the CPU; moved after, so models logged before they declared a device move too
    return pyfunc.unwrap_python_model().module.to(device)


REGISTERED_PREFIX = "regression-"  # registered model names: regression-<model>, a name params.yaml's models list
CHAMPION = "champion"


def registered_name(model: str) -> str:
    """The registry name of one of the pipeline's models."""
    return f"{REGISTERED_PREFIX}{model}"


def champion(model: str) -> tuple[str, str]:
    """`models:/regression-<model>@champion` and the version it names, checked to exist, so serving fails in one line.

    A refusal (401/403 for a model that exists) is a permission problem; anything else is "no champion yet".
    """
    uri = tracking_uri()
    client = open_existing(uri)
    name = registered_name(model)
    try:
        version = _champion(client, name)
    except MlflowException as exc:
        if status := permission_status(exc):
            raise permission_refused(uri, status, f"reading {name}@{CHAMPION}", f"registered model {name}") from None
        version = None
    if version is None:
        raise TrackingError(
            f"no {name}@{CHAMPION} in the model registry at {uri}; run `dvc repro` (evaluate registers the models)"
        )
    return f"models:/{name}@{CHAMPION}", str(version.version)


def register_model(
    client: MlflowClient, experiment_id: str, run_id: str, model: str, model_digest: str, val_mse: float,
    test_mse: float, data_digest: str,
) -> str | None:
    """Register the logged model of the run that trained these weights (once per run), elect the champion.

    Returns the report line (also set as the tag `registry.<model>` on run `run_id`), or
    None when no finished training run made these weights. `champion` points at the
    lowest validation MSE among the versions scored on the same data digest (ties: the lowest
    version number): choosing on the test split would make its score a selected one, no longer
    an unbiased report; the test MSE is tagged and reported beside. A champion scored on other
    data is reported, not compared, and left alone. The registry has no lock, so the version is
    registered first (its scores as tags, in the same request) and then elected by `_elect`,
    which repeats read-all / set / re-read until what it reads is stable: however many
    evaluates race on one server, the last one to settle sees every version and leaves the
    alias on the best. The report says what is true when this evaluate ends. The embedded store keeps its file lock around it
    (queued experiments evaluate in parallel on it), which makes the loop run once.
    """
    train_run = training_run(client, experiment_id, model, model_digest)
    if train_run is None:
        return None
    name = registered_name(model)
    uri = tracking_uri()
    with store_lock(sqlite_file(uri)) if is_sqlite(uri) else nullcontext():
        before = _champion(client, name)
        version = _version_for_run(client, name, train_run, experiment_id, val_mse, test_mse, data_digest)
        if version is None:
            report = f"{name}: training run {train_run} logged no model; nothing registered"
        else:
            after = _elect(client, name, data_digest)
            said = _report(str(version.version), val_mse, test_mse, data_digest, before, after)
            report = f"{name} v{version.version}: {said}"
    client.set_tag(run_id, f"registry.{model}", report)
    return report


def _version_for_run(
    client: MlflowClient, name: str, run_id: str, experiment_id: str, val_mse: float, test_mse: float,
    data_digest: str,
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
    try:  # its creator may then manage it (MLflow's auth app): a user who is not an admin owns what evaluate made
        client.create_registered_model(
            name, description="Trained by the regression pipeline; alias champion = lowest validation MSE (test MSE beside it)"
        )
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS") and not _lost_race(exc):
            raise
    tags = {"data.digest": data_digest, "val_mse": repr(float(val_mse)), "test_mse": repr(float(test_mse))}
    return client.create_model_version(
        name, source=logged[0].model_uri, run_id=run_id, tags=tags, model_id=logged[0].model_id, await_creation_for=0,
    )


MAX_ROUNDS = 50  # each round that is not stable follows a write by a racing evaluate; a few settle any race


def _lost_race(exc: MlflowException) -> bool:
    """Whether the server refused a write because a concurrent one made the same row first.

    MLflow's SQL store reads, then inserts: two evaluates creating the registered
    model or the `champion` alias at once make one of them fail on the unique key
    (SQLite, PostgreSQL and MySQL word it differently). Rereading is the answer.
    """
    text = str(exc).lower()
    return "unique constraint" in text or "duplicate" in text or "integrityerror" in text


def _score(version: Any, tag: str = "val_mse") -> float | None:
    """A version's validation MSE tag (what the champion is chosen on) as a number, or None when it has none
    (registered by hand, or before the champion moved on validation); `tag="test_mse"`: the reported one."""
    try:
        return float(version.tags[tag])
    except (KeyError, TypeError, ValueError):
        return None


def _champion(client: MlflowClient, name: str) -> Any:
    """The version `champion` points at now, or None when there is none (any other failure is raised).

    MLflow's auth app answers a user who is not an admin 403, not 404, for the alias of a model
    that does not exist yet: a 403 is a refusal only when the model itself is there.
    """
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") and "not found" in exc.message:
            return None
        if permission_status(exc) and not _registered(client, name):
            return None
        raise


def _registered(client: MlflowClient, name: str) -> bool:
    """Whether registered model `name` exists (asked where the auth app's 403 cannot tell)."""
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def _same_data(client: MlflowClient, name: str, data_digest: str) -> list[Any]:
    """Every scored version of `name` on `data_digest` (all pages)."""
    versions = all_pages(lambda token: client.search_model_versions(f"name = '{name}'", page_token=token))
    return [v for v in versions if v.tags.get("data.digest") == data_digest and _score(v) is not None]


def _elect(client: MlflowClient, name: str, data_digest: str) -> Any:
    """Point `champion` at the best version on `data_digest` and return the champion once a read shows it stable.

    Each round reads every version, then the alias; it stops when the alias is the
    best of what it read (or is on other data, which is not ours to move), and else
    sets it and reads again. Why that suffices without a lock: an evaluate settles
    only on a read of all versions taken after its own last write; the evaluate that
    registered last reads every version, so whichever write lands last is checked by
    its writer against a complete read, or is corrected by the one that registered last.
    """
    for _ in range(MAX_ROUNDS):
        versions = _same_data(client, name, data_digest)
        champion = _champion(client, name)
        if not versions:
            return champion
        best = min(versions, key=lambda v: (_score(v), int(v.version)))
        if champion is not None and (champion.tags.get("data.digest") != data_digest or _score(champion) is None):
            return champion  # scored on other data (or not scored): reported, never replaced from here
        if champion is not None and str(champion.version) == str(best.version):
            return champion
        try:
            client.set_registered_model_alias(name, CHAMPION, best.version)
        except MlflowException as exc:
            if not _lost_race(exc):
                raise
    raise TrackingError(
        f"{name}: the {CHAMPION} alias was still moving after {MAX_ROUNDS} rounds of concurrent evaluates; "
        "run evaluate again once they have finished"
    )


def _shown(value: float | None) -> str:
    """A score as the report lines print it; '?' for a version that has none."""
    return "?" if value is None else f"{value:.6g}"


def _report(mine: str, val_mse: float, test_mse: float, data_digest: str, before: Any, after: Any) -> str:
    """What is true as this evaluate ends: whether version `mine` is the champion, and against what (the validation
    MSE decides; the test MSE is shown beside it, for reporting only)."""
    test = f"test_mse {_shown(test_mse)}"
    if after is not None and after.tags.get("data.digest") != data_digest:
        theirs = after.tags.get("data.digest", "none")
        return (
            f"not compared: {CHAMPION} v{after.version} was scored on other data "
            f"(data.digest {theirs[:8]}, this one {data_digest[:8]}); {CHAMPION} unchanged"
        )
    if after is None or _score(after) is None:
        return (f"not compared: {CHAMPION} v{after.version if after else '?'} has no val_mse tag (set by hand, or "
                f"chosen before the champion moved on validation); {CHAMPION} unchanged")
    best = _score(after)
    if str(after.version) != mine:
        moved = "stays" if before is not None and str(before.version) == str(after.version) else "is"
        return (f"{CHAMPION} {moved} v{after.version} (val_mse {_shown(best)} <= {_shown(val_mse)}; "
                f"test_mse {_shown(_score(after, 'test_mse'))}, this one {_shown(test_mse)})")
    if before is None:
        return f"first {CHAMPION} (val_mse {_shown(val_mse)}; {test})"
    if str(before.version) == mine:
        return f"already {CHAMPION} (val_mse {_shown(val_mse)}; {test})"
    previous = _score(before)
    if before.tags.get("data.digest") != data_digest or previous is None:
        return f"new {CHAMPION} (val_mse {_shown(val_mse)}; {test}; v{before.version} was scored on other data)"
    return f"new {CHAMPION} (val_mse {_shown(val_mse)} < {_shown(previous)} of v{before.version}; {test})"
