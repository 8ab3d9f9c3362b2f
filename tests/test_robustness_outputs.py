"""What a run leaves behind: bit-for-bit reruns, weights and logged models that load without pickle.

Set-up shared by tests/test_robustness_*.py: tests/helpers.py, and the `baseline` fixture in tests/conftest.py.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import data
from pipeline.files import md5_file
from tests.helpers import clone, dvc, model_names, pipeline_stages, statuses


# ---------------------------------------------------------------- bit-for-bit reruns


@pytest.mark.slow
def test_forced_rerun_is_bit_for_bit(baseline: Path, tmp_path: Path) -> None:
    repo = clone(baseline, tmp_path / "repo")
    dvc(repo, "repro", "--force")
    assert (repo / "dvc.lock").read_bytes() == (baseline / "dvc.lock").read_bytes()
    for rel in [*(f"data/{s}.parquet" for s in data.SPLITS), *(f"models/{m}.safetensors" for m in model_names())]:
        assert md5_file(repo / rel) == md5_file(baseline / rel), rel
    assert statuses(repo).keys() == set(pipeline_stages())


# ---------------------------------------------------------------- safe weights


@pytest.mark.slow
def test_weights_load_without_unpickling(baseline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    import torch
    from safetensors import safe_open

    from pipeline import models

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("unpickling was attempted")

    for name in model_names():
        raw = (baseline / "models" / f"{name}.safetensors").read_bytes()
        (size,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header length, JSON header, raw tensor bytes
        header = json.loads(raw[8 : 8 + size])
        assert "spec" in header["__metadata__"]
        with safe_open(str(baseline / "models" / f"{name}.safetensors"), framework="pt") as fh:
            assert set(fh.keys()) == {k for k in header if k != "__metadata__"}
    with monkeypatch.context() as m:
        for target, attr in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
            m.setattr(target, attr, refuse)
        model, spec = models.load_weights(baseline / "models" / "mlp.safetensors")
    assert spec.kind == "mlp" and torch.isfinite(model(torch.ones(2, 10))).all()


@pytest.mark.slow
def test_logged_models_are_the_weights_plus_code_and_load_with_pickle_disallowed(
    baseline: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each logged model holds the stage's safetensors file byte for byte and the code that rebuilds it;
    loading it never reaches pickle or torch.load, even with MLflow's pickle switch off."""
    import pickle

    import mlflow.pyfunc
    import torch
    from mlflow.tracking import MlflowClient

    from pipeline import models

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("unpickling attempted")

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    client = MlflowClient(f"sqlite:///{baseline / 'mlflow.db'}")
    # one per train stage, each under a run of the baseline's store (tests change copies, never the baseline)
    own = {r.info.run_id for r in client.search_runs([client.get_experiment_by_name("regression").experiment_id])}
    logged = sorted((baseline / "mlartifacts" / "models").glob("*/artifacts/MLmodel"))
    assert len(logged) == 3 and {yaml.safe_load(m.read_text())["run_id"] for m in logged} <= own
    for mlmodel in logged:
        meta = yaml.safe_load(mlmodel.read_text())
        pyfunc_conf = meta["flavors"]["python_function"]
        assert set(meta["flavors"]) == {"python_function"} and pyfunc_conf["loader_module"] == "mlflow.pyfunc.loaders.code_model"
        name = client.get_run(meta["run_id"]).data.tags["model"]
        weights = baseline / "models" / f"{name}.safetensors"
        assert (mlmodel.parent / pyfunc_conf["artifacts"]["weights"]["path"]).read_bytes() == weights.read_bytes()
        assert not [p for p in mlmodel.parent.rglob("*") if p.suffix in (".pkl", ".pt", ".pt2", ".pth")]
        with monkeypatch.context() as m:
            for target, attr in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
                m.setattr(target, attr, refuse)
            loaded = mlflow.pyfunc.load_model(str(mlmodel.parent))
        reference, _ = models.load_weights(weights)
        x = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(torch.from_numpy(loaded.predict(x.numpy())), reference(x)), name
