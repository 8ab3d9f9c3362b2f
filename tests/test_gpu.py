"""Training on CUDA: skipped without a GPU, exercised when one is present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import models, training
from pipeline.device import resolve_device
from tests.helpers import requires_cuda


@requires_cuda
def test_both_loops_train_on_cuda() -> None:
    device = resolve_device("auto")
    assert device.type == "cuda"
    X = torch.randn(2048, 8, device=device)
    y = X @ torch.randn(8, 1, device=device) + 0.1 * torch.randn(2048, 1, device=device)
    gd = training.gradient_descent(training.Splits(X[:1536], y[:1536], X[1536:], y[1536:]), steps=100, lr=0.1, progress=False)
    assert gd.model.weight.device.type == "cuda" and gd.history.val_loss[-1] < 0.05
    mlp = training.fit(models.mlp(8, [32], "relu", 0.0), training.Splits(X[:1536], y[:1536], X[1536:], y[1536:]), training.FitSettings(optimizer="adam", lr=0.01, weight_decay=0.0, batch_size=128, epochs=10, seed=0, schedule="cosine", patience=5, progress=False))
    assert next(mlp.model.parameters()).device.type == "cuda"
    assert mlp.history.val_loss[-1] < mlp.history.val_loss[0]


@requires_cuda
@pytest.mark.slow
def test_pipeline_on_cuda_is_quiet_graphed_and_its_models_serve_here(tmp_path: Path) -> None:
    """`dvc repro` with device auto on a CUDA host: trained there, graphs used, nothing alarming printed,
    and the logged models load through pyfunc (on the CPU, as anywhere) and serve."""
    from mlflow import MlflowClient

    from tests.helpers import check_logged_models, copy_project, dvc, quiet

    repo = copy_project(tmp_path / "repo", {"device": "auto", "cuda_graph": True})
    proc = dvc(repo, "repro")
    assert quiet(proc.stderr), proc.stderr
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("regression")
    runs = {r.data.tags["stage"]: r.data.tags for r in client.search_runs([exp.experiment_id])}
    for name in ("linear", "mlp"):
        assert runs[f"train@{name}"]["device"].startswith("cuda")
        assert runs[f"train@{name}"]["training.loop"] == "cuda_graph"
    check_logged_models(repo, tmp_path)
