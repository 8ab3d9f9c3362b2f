"""Where the stages read and write: the DVC outputs of dvc.yaml, one name each."""

from __future__ import annotations

from pathlib import Path

from pipeline.files import md5_file

DATA = Path("data")
MODELS = Path("models")
METRICS = Path("metrics")
PLOTS = Path("plots")
SPLITS = ("train", "val", "test")
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


def split_digests() -> dict[str, str]:
    """md5 of each split file (as dvc.lock records it), keyed by split: the data's identity in MLflow."""
    return {split: md5_file(split_path(split)) for split in SPLITS}
