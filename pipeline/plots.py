"""PNG pictures of a run: loss curves, and predicted against actual with the noise-floor band.

Pure: takes arrays, writes a PNG (into a path publish handed out), returns nothing.
Figures are drawn with matplotlib's Agg renderer directly (no pyplot, no display, no global
state), and the PNG carries no version or date metadata, so the same numbers give the same bytes and `dvc.lock` does not change.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, MaxNLocator


SIZE = (6.4, 4.2)  # inches; at DPI, 640x420 pixels
SQUARE = (5.6, 5.6)
DPI = 100
TRAIN, VAL, BAND = "#1f77b4", "#ff7f0e", "#2ca02c"


def _save(fig: Figure, path: str | Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})  # into a publish temp


def loss_curves(
    path: str | Path, title: str, x_label: str,
    train: tuple[Sequence[float], Sequence[float]], val: tuple[Sequence[float], Sequence[float]],
) -> None:
    """Train and validation loss (MSE, log scale) against steps or epochs, as the model counted them."""
    fig = Figure(figsize=SIZE)
    ax = fig.subplots()
    ax.plot(*train, color=TRAIN, label="train loss", linewidth=1.2)
    ax.plot(*val, color=VAL, label="validation loss", linewidth=1.6, marker="o" if len(val[0]) <= 60 else None, markersize=3)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole steps and epochs
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(FormatStrFormatter("%g"))  # 1.5, not 1.5×10⁰
    ax.set_xlabel(x_label)
    ax.set_ylabel("MSE loss (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save(fig, path)


def predicted_vs_actual(path: str | Path, title: str, actual: np.ndarray, predicted: np.ndarray, noise_std: float) -> None:
    """Test predictions against the truth; the band is actual ± noise_std, where a perfect model's points fall 68% of the time."""
    actual = np.asarray(actual, np.float64)
    predicted = np.asarray(predicted, np.float64)
    lo = float(min(actual.min(), predicted.min()))
    hi = float(max(actual.max(), predicted.max()))
    line = np.array([lo, hi])
    fig = Figure(figsize=SQUARE)
    ax = fig.subplots()
    ax.fill_between(line, line - noise_std, line + noise_std, color=BAND, alpha=0.2,
                    label=f"noise floor: actual ± noise_std ({noise_std:g})")
    ax.plot(line, line, color=BAND, linewidth=1, label="predicted = actual")
    ax.scatter(actual, predicted, s=6, alpha=0.5, color=TRAIN, label=f"test rows ({len(actual)})")
    ax.set_xlabel("actual y (test split)")
    ax.set_ylabel("predicted y")
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    _save(fig, path)
