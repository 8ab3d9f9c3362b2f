"""A PyTorch model as an MLflow logged model: pt2 export (no pickle), signature, input example, CPU pyfunc."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np


def log_torch_model(run_id: str, name: str, model: Any, input_example: np.ndarray, requirements: list[str]) -> str:
    """Log `model` to run `run_id` as logged model `name`; return its URI.

    The export holds CPU weights, and its pyfunc flavor is pinned to the CPU
    (`model_config: {device: cpu}` in MLmodel), so `mlflow.pyfunc.load_model`
    and `mlflow models serve` work on hosts with and without CUDA; left
    unset, pyfunc picks CUDA wherever it exists and cannot move a pt2 export.
    The run must be MLflow's active run (see run.py): `Model.log` files the
    logged model under the active run's experiment, and has no argument for it.
    """
    import torch  # only train@ logs a model: the other stages skip these imports
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
            name=name,
            flavor=_PytorchOnCpu,
            flavor_name="mlflow.pytorch",
            run_id=run_id,
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
