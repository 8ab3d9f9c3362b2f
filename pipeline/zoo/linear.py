"""`linear`: y = X·w + b as `nn.Linear`, trained with a `torch.optim` optimizer over mini-batches."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from pipeline.zoo import (
    MAX_BATCH, MAX_EPOCHS, Block, Optimizer, TrainContext, check_batch, fit_settings, mini_batch_neutral,
)

if TYPE_CHECKING:
    from pipeline.models import ModelSpec
    from pipeline.training import Splits, TrainResult

X_LABEL = "epoch"
CHECKPOINT_UNIT = "epoch"


class Params(Block):
    """nn.Linear trained with a torch.optim optimizer over mini-batches."""

    optimizer: Optimizer
    lr: float = Field(gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(gt=0, le=MAX_BATCH)
    epochs: int = Field(gt=0, le=MAX_EPOCHS)

    def check(self, n_features: int, train_rows: int) -> None:
        """A batch fits in the train split."""
        check_batch(self.batch_size, train_rows)


neutral = mini_batch_neutral  # its optimizer as params.yaml gives it


def train(p: Params, splits: Splits, ctx: TrainContext) -> tuple[TrainResult, ModelSpec]:
    """Every epoch trained (no early stopping), the final weights kept."""
    from pipeline import models, training

    spec = models.ModelSpec("linear", splits.X.shape[1])
    return training.fit(models.build(spec), splits, fit_settings(p, ctx)), spec
