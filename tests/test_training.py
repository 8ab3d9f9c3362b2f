"""Training loops: losses go down, gradient descent reaches least squares, divergence is caught."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline import device, evaluation, models, training
from tests.helpers import ROOT, run_env


def _problem(n: int = 512, d: int = 4, seed: int = 0, nonlinear: bool = False) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen)
    w = torch.randn(d, 1, generator=gen)
    y = X @ w + 0.3 + 0.1 * torch.randn(n, 1, generator=gen)
    if nonlinear:
        y += X[:, :1] ** 2 - 1
    cut = n * 3 // 4
    return X[:cut], y[:cut], X[cut:], y[cut:]


def test_autograd_gradient_matches_the_analytical_one() -> None:
    X, y, _, _ = _problem()
    w = torch.randn(4, 1, requires_grad=True)
    b = torch.randn(1, requires_grad=True)
    ((X @ w + b - y) ** 2).mean().backward()
    gw, gb = training.analytic_gradient(X, y, w.detach(), b.detach())
    torch.testing.assert_close(w.grad, gw)
    torch.testing.assert_close(b.grad, gb)


def test_linear_gd_reaches_the_least_squares_weights_on_linear_data() -> None:
    X, y, Xv, yv = _problem()
    result = training.gradient_descent(training.Splits(X, y, Xv, yv), steps=300, lr=0.1, progress=False)
    w_ls, b_ls = evaluation.least_squares(X.numpy(), y.numpy().ravel())
    np.testing.assert_allclose(result.model.weight.detach().numpy().ravel(), w_ls, atol=1e-4)
    assert abs(result.model.bias.item() - b_ls) < 1e-4
    assert result.extra["grad_check_max_abs_diff"] < 1e-5
    assert len(result.step_losses) == 300
    assert result.step_losses[-1] < result.step_losses[0] / 10


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_minibatch_training_lowers_the_loss(optimizer: str) -> None:
    X, y, Xv, yv = _problem()
    result = training.fit(models.linear(4), training.Splits(X, y, Xv, yv), training.FitSettings(optimizer=optimizer, lr=0.05, weight_decay=0.0, batch_size=32, epochs=15, seed=0, progress=False))
    assert result.history.train_loss[-1] < result.history.train_loss[0] / 2
    assert len(result.history.step) == 15 and not result.stopped_early


def test_mlp_fits_what_a_line_cannot() -> None:
    torch.manual_seed(0)
    X, y, Xv, yv = _problem(n=2048, nonlinear=True)
    result = training.fit(models.mlp(4, [32, 32], "relu", 0.0), training.Splits(X, y, Xv, yv), training.FitSettings(optimizer="adam", lr=0.01, weight_decay=0.0, batch_size=64, epochs=40, seed=0, schedule="cosine", patience=10, progress=False))
    w_ls, b_ls = evaluation.least_squares(X.numpy(), y.numpy().ravel())
    ls_val = float(np.mean((Xv.numpy() @ w_ls + b_ls - yv.numpy().ravel()) ** 2))
    assert min(result.history.val_loss) < ls_val / 5


def test_early_stopping_keeps_the_best_weights() -> None:
    X, y, Xv, yv = _problem()
    model = models.mlp(4, [16], "relu", 0.0)
    result = training.fit(model, training.Splits(X, y, Xv, yv), training.FitSettings(optimizer="sgd", lr=0.05, weight_decay=0.0, batch_size=16, epochs=200, seed=0, patience=3, progress=False))
    assert result.stopped_early
    assert result.history.step[-1] == result.best_step + 3
    final_val = training.mse(result.model, Xv, yv).item()
    assert final_val == pytest.approx(min(result.history.val_loss), rel=1e-5)


def test_same_seed_same_weights() -> None:
    X, y, Xv, yv = _problem()
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        result = training.fit(models.mlp(4, [8], "relu", 0.2), training.Splits(X, y, Xv, yv), training.FitSettings(optimizer="adam", lr=0.01, weight_decay=0.0, batch_size=32, epochs=3, seed=7, progress=False))
        runs.append(torch.cat([p.detach().ravel() for p in result.model.parameters()]))
    assert torch.equal(runs[0], runs[1])


def test_divergence_names_the_step_and_keeps_the_curve() -> None:
    X, y, Xv, yv = _problem()
    with pytest.raises(training.Diverged) as gd:
        training.gradient_descent(training.Splits(X * 100, y, Xv, yv), steps=50, lr=10.0, log_every=5, progress=False)
    assert 0 < gd.value.step < 50 and "at step" in str(gd.value)
    with pytest.raises(training.Diverged) as mb:
        training.fit(models.linear(4), training.Splits(X * 100, y, Xv, yv), training.FitSettings(optimizer="sgd", lr=100.0, weight_decay=0.0, batch_size=32, epochs=5, seed=0, progress=False))
    assert mb.value.step >= 0


def test_device_resolution() -> None:
    assert device.resolve_device("cpu").type == "cpu"
    assert device.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(training.PipelineError, match="no CUDA device"):
            device.resolve_device("cuda")


def test_seed_everything_asks_for_deterministic_kernels() -> None:
    """torch's own switch, warnings only (a kernel with no deterministic version warns, it does not stop the stage)."""
    script = """
import torch
from pipeline.device import seed_everything
seed_everything(3)
assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
assert torch.initial_seed() == 3
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
