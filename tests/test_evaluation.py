"""The exact references and the metrics."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import evaluation


def test_least_squares_recovers_exact_weights_without_noise() -> None:
    X = np.random.default_rng(0).standard_normal((200, 3)).astype(np.float32)
    y = X.astype(np.float64) @ np.array([1.0, -2.0, 0.5]) + 3.0
    w, b = evaluation.least_squares(X, y)
    np.testing.assert_allclose(w, [1.0, -2.0, 0.5], atol=1e-6)
    assert b == pytest.approx(3.0, abs=1e-6)


def test_regression_metrics_by_hand() -> None:
    m = evaluation.regression_metrics(np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.0, 1.0, 2.0, 5.0]))
    assert m["mse"] == pytest.approx(1.0)
    assert m["rmse"] == pytest.approx(1.0)
    assert m["mae"] == pytest.approx(0.5)
    assert m["r2"] == pytest.approx(1 - 1.0 / 1.25)


def test_ratios_and_weight_distance() -> None:
    r = evaluation.compare_to_references(2.0, least_squares_mse=1.0, noise_floor=0.5)
    assert r == {"ratio_to_least_squares": 2.0, "ratio_to_noise_floor": 4.0}
    d = evaluation.weight_distance(np.array([3.0, 4.0]), 1.0, np.zeros(2), 0.5)
    assert d == {"weight_distance": 5.0, "bias_distance": 0.5}
