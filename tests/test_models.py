"""The three models: shapes, weight files that round-trip without pickle, and the MLflow model logged from them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import models
from tests.helpers import ROOT


def test_linear_from_weights_matches_the_formula() -> None:
    w = torch.tensor([[1.0], [-2.0], [0.5]])
    b = torch.tensor([0.25])
    X = torch.randn(7, 3)
    model = models.linear_from_weights(w, b)
    torch.testing.assert_close(model(X), X @ w + b)


@pytest.mark.parametrize("activation", sorted(models.ACTIVATIONS))
def test_mlp_shape_and_layers(activation: str) -> None:
    model = models.mlp(4, [16, 8], activation, dropout=0.1)
    assert model(torch.randn(5, 4)).shape == (5, 1)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(4, 16), (16, 8), (8, 1)]
    assert sum(isinstance(m, torch.nn.Dropout) for m in model) == 2
    assert models.count_parameters(model) == 4 * 16 + 16 + 16 * 8 + 8 + 8 + 1


@pytest.mark.parametrize(
    "spec",
    [models.ModelSpec("linear", 3), models.ModelSpec("mlp", 3, (5,), "tanh", 0.0)],
)
def test_weights_round_trip_through_safetensors(tmp_path: Path, spec: models.ModelSpec) -> None:
    model = models.build(spec)
    path = tmp_path / "m.safetensors"
    models.save_weights(model, spec, path)
    loaded, loaded_spec = models.load_weights(path)
    assert loaded_spec == spec
    X = torch.randn(4, 3)
    torch.testing.assert_close(loaded(X), model.eval()(X))
    assert path.read_bytes()[8:9] == b"{"  # safetensors: 8-byte header length, then a JSON header


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="allowed: linear, mlp"):
        models.build(models.ModelSpec("cnn", 3))  # type: ignore[arg-type]


def test_spec_json_is_the_header_earlier_versions_wrote() -> None:
    """The header bytes are hashed into dvc.lock: a linear spec has no mlp fields, keys stay sorted."""
    assert models.ModelSpec("linear", 3).to_json() == '{"kind": "linear", "n_features": 3}'
    mlp = models.ModelSpec("mlp", 3, (5, 4), "tanh", 0.1)
    assert mlp.to_json() == '{"activation": "tanh", "dropout": 0.1, "hidden": [5, 4], "kind": "mlp", "n_features": 3}'
    assert models.ModelSpec.from_json(mlp.to_json()) == mlp


@pytest.fixture
def logged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path, np.ndarray]:
    """An mlp's weights logged by a real train run into an embedded SQLite store: (model URI, weights, test rows)."""
    from pipeline import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    spec = models.ModelSpec("mlp", 4, (6, 5), "gelu", 0.2)
    weights = tmp_path / "mlp.safetensors"
    models.save_weights(models.build(spec), spec, weights)
    X = np.random.default_rng(0).normal(size=(9, 4)).astype(np.float32)
    with tracking.stage_run("train@mlp", "models-test", {"model": "mlp"}, "train@mlp") as run:
        uri = run.log_torch_model(weights, X[:3])
    return uri, weights, X


def _from_weights(weights: Path, X: np.ndarray) -> np.ndarray:
    module, _ = models.load_weights(weights)
    with torch.no_grad():
        return module(torch.from_numpy(X)).numpy()


def test_logged_model_is_weights_plus_code_and_loads_both_ways(logged: tuple[str, Path, np.ndarray]) -> None:
    """No pickle and no pt2: the weights file itself, the model's code and what rebuilds it; the pyfunc and
    the one-call nn.Module predict exactly what the weights predict."""
    import mlflow

    from pipeline import tracking

    uri, weights, X = logged
    mlflow.set_tracking_uri(tracking.tracking_uri())
    local = Path(mlflow.artifacts.download_artifacts(uri))
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert [f for f in files if f.startswith(("artifacts/", "code/"))] == [
        "artifacts/mlp.safetensors", "code/pipeline/__init__.py", "code/pipeline/errors.py", "code/pipeline/files.py", "code/pipeline/models.py",
    ]
    assert (local / "artifacts" / "mlp.safetensors").read_bytes() == weights.read_bytes()
    assert not [f for f in files if f.endswith((".pkl", ".pt", ".pt2", ".pth"))], files
    assert "pyfunc_model.py" in files and "input_example.json" in files
    pyfunc = mlflow.pyfunc.load_model(uri)
    assert pyfunc.unwrap_python_model().device == "cpu"  # with no model config: the CPU, on any host
    # the device is a key the model declares, so a load-time model_config reaches it (MLflow drops, with a
    # WARNING, every key a logged model does not declare); a CUDA host's check is tests.helpers.check_logged_models
    assert pyfunc.model_config == {"device": "cpu"}
    signature = pyfunc.metadata.signature
    assert (signature.inputs.inputs[0].shape, signature.outputs.inputs[0].shape) == ((-1, 4), (-1, 1))
    np.testing.assert_array_equal(pyfunc.predict(X), _from_weights(weights, X))
    module = tracking.load_torch_module(uri)
    assert isinstance(module, torch.nn.Sequential) and not module.training
    with torch.no_grad():
        np.testing.assert_array_equal(module(torch.from_numpy(X)).numpy(), _from_weights(weights, X))


def test_logged_model_loads_where_the_project_is_not_installed(logged: tuple[str, Path, np.ndarray], tmp_path: Path) -> None:
    """A fresh process that cannot import this checkout's `pipeline` loads the model from its shipped code."""
    import mlflow

    from pipeline import tracking

    uri, weights, X = logged
    local = mlflow.artifacts.download_artifacts(uri, tracking_uri=tracking.tracking_uri(), dst_path=str(tmp_path / "copy"))
    script = (
        "import sys, json, numpy as np\n"
        "sys.path = [p for p in sys.path if p not in ('', sys.argv[2])]\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '_EditableFinder' not in repr(f)]  # the venv's -e install\n"
        "try:\n    import pipeline\nexcept ImportError:\n    pass\nelse:\n    sys.exit('pipeline is importable: ' + pipeline.__file__)\n"
        "import mlflow.pyfunc\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "X = np.array(json.loads(sys.stdin.read()), dtype=np.float32)\n"
        "print(json.dumps(model.predict(X).ravel().tolist()))\n"
        "print(sys.modules['pipeline.models'].__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run([sys.executable, "-c", script, local, str(ROOT)], input=json.dumps(X.tolist()), cwd=tmp_path,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    predictions, models_file = proc.stdout.splitlines()[-2:]
    assert models_file.startswith(str(Path(local) / "code" / "pipeline")), models_file
    np.testing.assert_array_equal(np.array(json.loads(predictions), dtype=np.float32), _from_weights(weights, X).ravel())


@pytest.mark.bad_input
def test_rows_are_checked_in_one_line_naming_row_and_column(request: pytest.FixtureRequest) -> None:
    from mlflow.exceptions import MlflowException

    from pipeline.tracking.pyfunc_model import checked_rows, one_line

    good = np.full((3, 4), 0.5)
    assert checked_rows(good, 4).dtype == np.float32 and checked_rows([0.5] * 4, 4).shape == (1, 4)
    cases = []
    for value, says in [(np.nan, "row 2, column 1: the value is missing (null or NaN)"),
                        (np.inf, "row 2, column 1: the value is infinite"), (-1e300, "row 2, column 1: the value is -1e+300")]:
        rows = good.copy()
        rows[2, 1] = value
        cases.append((rows, says))
    cases += [(good[:, :3], "row 0 has 3 values, the model takes 4"), ([["a", 1, 2, 3]], "the rows are not all numbers"),
              (np.zeros((0, 4)), "expected a table of rows, got an array of shape [0, 4]"), (3.0, "got an array of shape []"),
              ([[None, 1, 2, 3]], "row 0, column 0: the value is missing")]
    for rows, says in cases:
        with pytest.raises(MlflowException, match=re.escape(says) + ".*send rows of 4 finite numbers$") as caught:
            checked_rows(rows, 4)
        assert caught.value.get_http_status_code() == 400
    request.node.user_properties.append(("bad_input_cases", len(cases)))
    echo = "Failed to predict data '[[1 2]\n [3 4]]'. \nError: Failed to enforce schema of data '[[1 2]\n [3 4]]' with " \
           "schema '[Tensor('float32', (-1, 10))]'. Error: Shape of input (2, 2) does not match expected shape (-1, 10)."
    assert one_line(echo) == "row 0 has 2 values, the model takes 10; send rows of 10 finite numbers"
    assert one_line("Invalid input. Ensure that input is a valid JSON. Error: 'x'\nInput: \n{\"a\"") == \
        "Invalid input. Ensure that input is a valid JSON. Error: 'x'"
