"""`linear_gd`: y = X·w + b by full-batch gradient descent, the gradient from autograd and the step written by hand.

The source notes' loop made into a model (pipeline/training.py's `gradient_descent`): each step is plain
gradient descent on the whole train split, so it has no optimizer and no batches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from pipeline.zoo import Block, TrainContext

if TYPE_CHECKING:
    from pipeline.models import ModelSpec
    from pipeline.training import Splits, TrainResult

MAX_STEPS = 1_000_000
X_LABEL = "gradient step (full batch)"
CHECKPOINT_UNIT = "step"


class Params(Block):
    """Full-batch gradient descent written out by hand (the source notes' loop)."""

    steps: int = Field(gt=0, le=MAX_STEPS)
    lr: float = Field(gt=0)


def neutral(p: Params, train_rows: int) -> dict[str, Any]:
    """A step is plain gradient descent on every train row: optimizer `gd (full batch)`, an epoch per step."""
    return {"optimizer": "gd (full batch)", "lr": p.lr, "batch_size": train_rows, "epochs": p.steps, "weight_decay": 0.0}


def train(p: Params, splits: Splits, ctx: TrainContext) -> tuple[TrainResult, ModelSpec]:
    """The hand-written loop, its weights as an nn.Linear."""
    from pipeline import models, training

    loop = ctx.loop
    result = training.gradient_descent(splits, steps=p.steps, lr=p.lr, progress=loop.progress, desc=loop.desc,
                                       checkpoint=loop.checkpoint, resume=loop.resume, report=loop.report)
    return result, models.ModelSpec("linear", splits.X.shape[1])
