"""The code of every logged model (MLflow "models from code"): safetensors weights rebuilt by pipeline.models.

MLflow copies this file into each logged model and runs it whenever the model is
loaded (`mlflow.pyfunc.load_model`, `mlflow models serve`); `set_model` at the end
names the model it serves. Loading reads the model's `weights` artifact (the stage's
models/<name>.safetensors) with `pipeline.models.load_weights`, shipped with the
model under code/pipeline/, so nothing is unpickled and no checkout is needed.
It predicts on the CPU unless told otherwise at load
(`mlflow.pyfunc.load_model(uri, model_config={"device": "cuda"})`).

Rows are checked before the model sees them: a missing or non-finite value, or a row
of the wrong width, is refused with one line naming the row and column, which the
scoring server answers with HTTP 400; in the server, every refusal is one line with no
stack trace (`serve_one_line_errors`).
"""

import re
import sys
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, DataType, Schema, TensorSpec

from pipeline.errors import first_line


def bad_input(message: str) -> MlflowException:
    """The error the scoring server answers with HTTP 400 and no stack trace."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def checked_rows(model_input: Any, n_features: int) -> np.ndarray:
    """`model_input` as a float32 [n, n_features] array; raises `bad_input` naming the first bad row and column."""
    allowed = f"send rows of {n_features} finite numbers"
    try:
        rows = np.asarray(model_input, dtype=np.float64)  # float64 first: a value past float32's range is no inf yet
    except (TypeError, ValueError) as exc:
        raise bad_input(f"the rows are not all numbers ({first_line(exc)}); {allowed}") from None
    if rows.ndim == 1 and rows.size == n_features:
        rows = rows.reshape(1, -1)
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise bad_input(f"expected a table of rows, got an array of shape {list(rows.shape)}; {allowed}")
    if rows.shape[1] != n_features:
        raise bad_input(f"row 0 has {rows.shape[1]} values, the model takes {n_features}; {allowed}")
    bad = ~np.isfinite(rows) | (np.abs(rows) > np.finfo(np.float32).max)
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        value = rows[row, column]
        what = "missing (null or NaN)" if np.isnan(value) else "infinite" if np.isinf(value) else f"{value:g}, beyond float32"
        raise bad_input(f"row {row}, column {column}: the value is {what}; {allowed}")
    return rows.astype(np.float32)


# MLflow's schema errors for rows of the wrong width (JSON arrays, then CSV columns): (found, expected).
WIDTH_ERRORS = (
    r"Shape of input \(\d+, (\d+)\) does not match expected shape \(-1, (\d+)\)",
    r"had (\d+) columns and an input shape of \(-1, (\d+)\)",
)


def one_line(message: str) -> str:
    """The part of a scoring-server error a client needs, on one line, without the echo of its input.

    MLflow prefixes a predict error with "Failed to predict data '<the rows>'. \nError: ", a schema
    error with "Failed to enforce schema of data '<the rows>' with schema '...'. Error: ", and a
    JSON error ends with "\nInput: \n<the whole request>".
    """
    if message.startswith("Failed to predict data ") and "\nError: " in message:
        message = message.split("\nError: ", 1)[1]
    if message.startswith("Failed to enforce schema of data ") and ". Error: " in message:
        message = message.rsplit(". Error: ", 1)[1]
    line = first_line(message, "the request could not be read")
    for pattern in WIDTH_ERRORS:
        if found := re.search(pattern, line):
            width, expected = found.groups()
            return f"row 0 has {width} values, the model takes {expected}; send rows of {expected} finite numbers"
    return line if len(line) <= 300 else line[:297] + "..."


def serve_one_line_errors() -> None:
    """In `mlflow models serve` (MLflow 3.17) only: every refused request answers one line and no stack trace.

    MLflow's scoring server has no setting for this: a CSV body that pandas cannot read always
    gets a `stack_trace` field, and a float32 tensor schema has no pandas types, so every CSV
    request fails that way. The one hook is the module function `invocations`, which its route
    looks up per request: wrapped here, CSV is read as d float32 columns (the tensor's width),
    and an MlflowException leaves as a new one with the same code (so the same HTTP status),
    its message cut to one line by `one_line`. Outside the server this does nothing.
    """
    server = sys.modules.get("mlflow.pyfunc.scoring_server")
    if server is None or getattr(server.invocations, "one_line_errors", False):
        return
    invocations = server.invocations

    def invocations_one_line(data: Any, content_type: Any, model: Any, input_schema: Any) -> Any:
        if str(content_type).split(";")[0].strip() == server.CONTENT_TYPE_CSV and input_schema is not None:
            spec = input_schema.inputs[0]
            if isinstance(spec, TensorSpec) and len(spec.shape) == 2 and spec.shape[1] > 0:
                input_schema = Schema([ColSpec(DataType.float)] * spec.shape[1])
        try:
            return invocations(data, content_type, model, input_schema)
        except MlflowException as exc:
            exc.message = one_line(exc.message)  # as MLflow rewrites it: the code, so the HTTP status, stays
            exc.json_kwargs.pop("stack_trace", None)
            raise exc from None

    invocations_one_line.one_line_errors = True  # type: ignore[attr-defined]
    server.invocations = invocations_one_line


class RegressionModel(PythonModel):
    """A trained regression model (X [n, d] -> predictions [n, 1]) behind MLflow's pyfunc interface."""

    def load_context(self, context: Any) -> None:
        """Rebuild the nn.Module from the weights artifact on the configured device (default: the CPU)."""
        from pipeline.models import load_weights  # torch and safetensors load here, not when the model is logged

        self.device = str((context.model_config or {}).get("device", "cpu"))
        self.module, self.spec = load_weights(context.artifacts["weights"], self.device)
        serve_one_line_errors()

    def predict(self, context: Any, model_input: np.ndarray, params: Any = None) -> np.ndarray:
        """Predictions [n, 1] for the checked rows of `model_input`.

        The signature's tensor schema makes MLflow pass an array (any other annotation but
        ndarray or DataFrame MLflow would read as a schema of its own, and warn).
        """
        import torch

        rows = checked_rows(model_input, self.spec.n_features)
        with torch.no_grad():
            return self.module(torch.from_numpy(rows).to(self.device)).cpu().numpy()


set_model(RegressionModel())
