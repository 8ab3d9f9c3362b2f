"""Metrics, and the two exact references every model is measured against.

- least squares: the closed-form linear model fitted on the training split,
  the best any linear model can do on this data;
- the noise floor: noise_std², the error of the true function (Bayes error).
"""

from __future__ import annotations

import numpy as np


def least_squares(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Closed-form least squares with intercept, in float64: returns (w [d], b)."""
    A = np.empty((X.shape[0], X.shape[1] + 1), dtype=np.float64)
    A[:, :-1] = X
    A[:, -1] = 1.0
    coef, *_ = np.linalg.lstsq(A, y.astype(np.float64), rcond=None)
    return coef[:-1], float(coef[-1])


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """MSE, RMSE, MAE and R² of predictions (computed in float64)."""
    y_true = y_true.astype(np.float64).ravel()
    residual = y_pred.astype(np.float64).ravel() - y_true
    mse = float(np.mean(residual**2))
    return {
        "mse": mse,
        "rmse": float(np.sqrt(mse)),
        "mae": float(np.mean(np.abs(residual))),
        "r2": float(1.0 - mse / np.var(y_true)),
    }


def compare_to_references(mse: float, least_squares_mse: float, noise_floor: float) -> dict[str, float]:
    """How far a model is from the two references, as ratios (1.0 = as good as the reference)."""
    return {
        "ratio_to_least_squares": mse / least_squares_mse,
        "ratio_to_noise_floor": mse / noise_floor if noise_floor > 0 else float("inf"),
    }


def weight_distance(w: np.ndarray, b: float, w_true: np.ndarray, b_true: float) -> dict[str, float]:
    """Euclidean distance of learned linear weights (and bias) from the true ones."""
    return {
        "weight_distance": float(np.linalg.norm(np.asarray(w, np.float64) - np.asarray(w_true, np.float64))),
        "bias_distance": float(abs(b - b_true)),
    }
