"""Where the stages read and write: the DVC outputs of dvc.yaml, one name each."""

from __future__ import annotations

from pathlib import Path

from pipeline import data

DATA = Path("data")
MODELS = Path("models")
METRICS = Path("metrics")
PLOTS = Path("plots")
TRUTH = DATA / "truth.json"


def split_path(split: str) -> Path:
    """Where generate writes one split."""
    return DATA / f"{split}.parquet"


def weights_path(model: str) -> Path:
    """Where a train stage writes its weights."""
    return MODELS / f"{model}.safetensors"


def loss_plot_path(model: str, suffix: str = ".csv") -> Path:
    """Where a train stage writes its loss curves (.csv data for DVC plots, .png picture)."""
    return PLOTS / "loss" / f"{model}{suffix}"


def train_metrics_path(model: str) -> Path:
    """Where a train stage writes its summary metrics."""
    return METRICS / "train" / f"{model}.json"


def verified_split_digests(truth: data.Truth) -> dict[str, str]:
    """md5 of each split file (as dvc.lock records it), keyed by split: the data's identity in MLflow.

    Checked against the md5 generate recorded in truth.json first: a stage refuses, in one line
    naming the file, data that is not what generate wrote, before it opens its run or writes anything.
    """
    data.verify_digests(truth, {split: split_path(split) for split in data.SPLITS})
    return dict(truth.digests)
