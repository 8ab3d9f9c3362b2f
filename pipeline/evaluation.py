"""Metrics, and the two exact references every model is measured against.

- least squares: the closed-form linear model fitted on the training split,
  the best any linear model can do on this data;
- the noise floor: noise_std², the error of the true function (Bayes error).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class References:
    """The two references on one test split: their metric rows, and what models are compared with."""

    rows: dict[str, dict[str, float]]  # least_squares, noise_floor
    least_squares_mse: float
    noise_floor: float
    w_true: np.ndarray
    b_true: float


def references(
    train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], noise_std: float,
    w_true: list[float], b_true: float,
) -> References:
    """Least squares fitted on the train split and the noise floor, scored on the test split."""
    (X_train, y_train), (X_test, y_test) = train, test
    w_ls, b_ls = least_squares(X_train, y_train)
    ls = regression_metrics(y_test, X_test.astype(np.float64) @ w_ls + b_ls)
    floor = noise_std**2
    w = np.asarray(w_true)
    rows = {
        "least_squares": {f"test_{k}": v for k, v in ls.items()}
        | compare_to_references(ls["mse"], ls["mse"], floor)
        | weight_distance(w_ls, b_ls, w, b_true),
        "noise_floor": {"test_mse": floor} | compare_to_references(floor, ls["mse"], floor),
    }
    return References(rows, ls["mse"], floor, w, b_true)


def score(refs: References, y_test: np.ndarray, predictions: np.ndarray,
          linear: tuple[np.ndarray, float] | None = None) -> dict[str, float]:
    """A model's test metrics, its ratios to the references and, for a linear model (w, b), its weight distances."""
    row = {f"test_{k}": v for k, v in regression_metrics(y_test, predictions).items()}
    row |= compare_to_references(row["test_mse"], refs.least_squares_mse, refs.noise_floor)
    if linear is not None:
        row |= weight_distance(*linear, refs.w_true, refs.b_true)
    return row
