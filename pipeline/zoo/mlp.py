"""`mlp`: a configurable multi-layer perceptron with early stopping on validation loss, data-parallel when asked."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config_errors import InvalidValue
from pipeline.zoo import (
    MAX_BATCH, MAX_EPOCHS, Block, Optimizer, TrainContext, check_batch, fit_settings, mini_batch_neutral,
)

if TYPE_CHECKING:
    from pipeline.models import ModelSpec
    from pipeline.training import Splits, TrainResult

MAX_LAYERS = 32                # entries of hidden
MAX_WIDTH = 16_384             # each entry of hidden
MAX_WEIGHTS = 100_000_000      # weights and biases of the whole MLP (400 MB as float32, before optimizer state)
MAX_NPROC = 64                 # distributed.nproc
X_LABEL = "epoch"
CHECKPOINT_UNIT = "epoch"

Activation = Literal["relu", "gelu", "tanh", "silu"]
Schedule = Literal["constant", "cosine", "step"]


class DistributedConfig(Block):
    """Data-parallel training: nproc > 1 runs DistributedDataParallel over that many processes."""

    nproc: int = Field(default=1, ge=1, le=MAX_NPROC)


class Params(Block):
    """A configurable MLP with early stopping on validation loss."""

    hidden: tuple[int, ...] = Field(min_length=1, max_length=MAX_LAYERS)
    activation: Activation
    dropout: float = Field(ge=0, lt=1)
    optimizer: Optimizer
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    schedule: Schedule
    batch_size: int = Field(gt=0, le=MAX_BATCH)
    epochs: int = Field(gt=0, le=MAX_EPOCHS)
    patience: int = Field(gt=0, le=MAX_EPOCHS)
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _rows_for_every_rank(self) -> Params:
        if self.distributed.nproc > self.batch_size:
            raise ValueError(
                f"distributed.nproc={self.distributed.nproc} is larger than batch_size={self.batch_size}; "
                "each process needs at least one row of every batch"
            )
        return self

    @field_validator("hidden", mode="before")
    @classmethod
    def _list_to_tuple(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):  # `-S mlp.hidden=32` instead of `[32]`
            raise ValueError(f"must be a list of layer widths, e.g. [{v}] (dvc exp run -S 'mlp.hidden=[{v}]') or [64, 64]")
        return tuple(v) if isinstance(v, list) else v

    @field_validator("hidden")
    @classmethod
    def _positive_widths(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(w <= 0 for w in v):
            raise InvalidValue(None, list(v), "every width must be greater than 0")
        if any(w > MAX_WIDTH for w in v):
            raise InvalidValue(None, list(v), f"every width must be at most {MAX_WIDTH}")
        return v

    def check(self, n_features: int, train_rows: int) -> None:
        """A batch fits in the train split, and the network in MAX_WEIGHTS."""
        check_batch(self.batch_size, train_rows)
        widths = (n_features, *self.hidden, 1)
        weights = sum((a + 1) * b for a, b in zip(widths, widths[1:]))
        if weights > MAX_WEIGHTS:
            raise InvalidValue("hidden", list(self.hidden),
                               f"gives {weights} weights with data.n_features={n_features}; at most {MAX_WEIGHTS} are allowed")

    def processes(self) -> int:
        """distributed.nproc processes, each training its slice of every batch."""
        return self.distributed.nproc


neutral = mini_batch_neutral  # its optimizer as params.yaml gives it; `epochs` the most (early stopping may end sooner)


def train(p: Params, splits: Splits, ctx: TrainContext) -> tuple[TrainResult, ModelSpec]:
    """Mini-batches with the learning-rate schedule, stopped when the val loss stalls (best weights kept)."""
    from pipeline import models, training

    settings = fit_settings(p, ctx, schedule=p.schedule, patience=p.patience, on_epoch=ctx.pruning())
    spec = models.ModelSpec("mlp", splits.X.shape[1], p.hidden, p.activation, p.dropout)
    result = training.fit(ctx.wrap(models.build(spec)), splits, settings)
    result.model = ctx.unwrap(result.model)  # the plain MLP inside DDP, for saving and logging
    return result, spec
