"""A trained PyTorch model as an MLflow logged model: its safetensors weights plus the code that rebuilds it.

The logged model is an MLflow "models from code" pyfunc: pyfunc_model.py (the model's
code), the stage's models/<name>.safetensors (artifact `weights`) and the few project
modules that rebuild the nn.Module from them (code/pipeline/). Nothing is pickled, and
logging imports neither torch nor a compiler: the pt2 flavor (torch.export) cost every
train stage about 2-3 s of imports, export and a load-back check, for a format that
rebuilding from the spec does not need. `load_torch_module` gives a PyTorch user the
nn.Module back in one call.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn

PACKAGE = Path(__file__).resolve().parents[1]  # pipeline/
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
# What pipeline.models.load_weights needs, shipped in the model as code/pipeline/ (tests/test_models.py loads a
# model with no checkout on the path, so a new import in models.py that is missing here fails there).
REBUILD_CODE = ("__init__.py", "files.py", "models.py")
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
            # no model_config: MLflow would copy it into the run's params, where `device` is the stage's own param
            signature=signature,
            input_example=example,
            pip_requirements=[f"{p}=={version(p).split('+')[0]}" for p in REQUIREMENTS],
            validate_serving_input=False,
        )
    return info.model_uri


@contextmanager
def _quietly() -> Iterator[None]:
    """Keep the stage's stderr to its own lines: no "Downloading artifacts" bar while MLflow copies the weights
    into the model, no INFO line for the example's check against the signature."""
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR as BARS

    before, logger = os.environ.get(BARS.name), logging.getLogger("mlflow.pyfunc")
    level = logger.level
    os.environ[BARS.name] = "false"
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
        if before is None:
            del os.environ[BARS.name]
        else:
            os.environ[BARS.name] = before


class _PyfuncWithoutReload:
    """mlflow.pyfunc as a flavor for `Model.log`, which takes `validate_serving_input` and pyfunc does not."""

    @staticmethod
    def save_model(path: str, mlflow_model: Any, validate_serving_input: bool = True, **kwargs: Any) -> None:
        """mlflow.pyfunc.save_model; `validate_serving_input` is Model.log's switch for the load-back check."""
        import mlflow.pyfunc

        mlflow.pyfunc.save_model(path=path, mlflow_model=mlflow_model, **kwargs)


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

    from pipeline.tracking.store import tracking_uri

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
    pyfunc = mlflow.pyfunc.load_model(local, model_config={"device": device})
    return pyfunc.unwrap_python_model().module
