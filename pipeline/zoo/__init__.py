"""The model registry: one module per model, pipeline/zoo/<name>.py, trained when params.yaml's `models` lists it.

A model module says everything the pipeline needs to know about its model, so no other file names one:

- `Params`: its params.yaml block (a `Block`: unknown keys, coercion and inf/nan are errors), with
  `check(n_features, train_rows)` for what the block cannot judge alone (a batch larger than the data);
- `X_LABEL`: what one point of its loss curve is (an epoch, a gradient step, ...);
- `CHECKPOINT_UNIT`: "epoch" or "step", which of `checkpoint.every_epochs` / `every_steps` it saves by;
- `neutral(p, train_rows)`: its NEUTRAL_PARAMS (less `model` and `parameters`), with values true for it,
  so every model lines up on MLflow's compare page;
- `train(p, splits, ctx)`: the trained model and its `pipeline.models.ModelSpec` (the architecture saved with
  the weights; a linear spec's weights are compared with the true ones by evaluate).

A model module is imported when params.yaml is checked, before torch loads (a typo costs one line, not seconds
of imports): its top imports only what its schema needs, and `train` imports the training code it calls.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from pipeline.config_errors import ConfigError, InvalidValue

if TYPE_CHECKING:
    from pipeline.training import FitSettings, LoopSettings

FOLDER = Path(__file__).parent
NAME = re.compile(r"^[a-z][a-z0-9_]{0,49}$")  # a model's name: its module, its stage train@<name>, its files

# Upper bounds shared by the mini-batch models (params.yaml's comments state them too).
MAX_EPOCHS = 100_000
MAX_BATCH = 1_000_000

Optimizer = Literal["sgd", "adam", "adamw"]

# The params every training run logs under the same names, whatever the model: MLflow's compare page and the
# `models` view line the models up on these (each model's own `<model>.*` params stay as they are).
NEUTRAL_PARAMS: tuple[str, ...] = ("model", "optimizer", "lr", "batch_size", "epochs", "weight_decay", "parameters")


class Block(BaseModel):
    """A section of params.yaml: unknown keys (a typo must not be silently ignored), type coercion and inf/nan
    are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    def check(self, n_features: int, train_rows: int) -> None:
        """Raise InvalidValue (its key relative to the block) when the block does not fit the data; here, nothing."""

    def processes(self) -> int:
        """How many data-parallel processes train the model (1: one process; a model that can use more says so)."""
        return 1


def check_batch(batch_size: int, train_rows: int) -> None:
    """A mini-batch model's batch must fit in the train split."""
    if batch_size > train_rows:
        raise InvalidValue("batch_size", batch_size,
                           f"must be at most {train_rows}, the rows in the train split (or raise data.n_samples)")


def mini_batch_neutral(p: Any, train_rows: int) -> dict[str, Any]:
    """The neutral params of a mini-batch model (a block with optimizer, lr, batch_size, epochs, weight_decay), as
    params.yaml gives them."""
    return {"optimizer": p.optimizer, "lr": p.lr, "batch_size": p.batch_size, "epochs": p.epochs,
            "weight_decay": p.weight_decay}


def fit_settings(p: Any, ctx: TrainContext, **more: Any) -> FitSettings:
    """pipeline.training.fit's settings for a mini-batch model's block and its stage's context (`more`: the rest)."""
    from pipeline.training import FitSettings

    return FitSettings(**vars(ctx.loop), optimizer=p.optimizer, lr=p.lr, weight_decay=p.weight_decay,
                       batch_size=p.batch_size, epochs=p.epochs, **more)


@dataclass(frozen=True)
class TrainContext:
    """What a model's `train` gets from its stage besides its own params: the run's settings and hooks.

    `wrap`/`unwrap` put a module in (and take it out of) DistributedDataParallel when several processes
    train. `pruning()` gives a search trial's `on_epoch(epoch, val_loss)`, which raises to stop it (None outside
    a search), for a model whose loop reports its epochs; asked for only by such a model, since finding the
    trial costs a connection to the study's storage.
    """

    loop: LoopSettings  # what every loop takes (seed, device options, shard, progress, checkpoint, report)
    pruning: Callable[[], Callable[[int, float], None] | None] = lambda: None
    wrap: Callable[[Any], Any] = lambda module: module
    unwrap: Callable[[Any], Any] = lambda module: module


def available() -> list[str]:
    """The models there are modules for, sorted."""
    return sorted(p.stem for p in FOLDER.glob("*.py") if NAME.match(p.stem))


def module(name: str) -> ModuleType:
    """The module of model `name`; a ConfigError naming the modules there when it has none."""
    if not NAME.match(name) or not (FOLDER / f"{name}.py").is_file():
        there = available()
        hint = difflib.get_close_matches(name, there, n=1)
        guess = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"models: no model module pipeline/zoo/{name}.py{guess}; there are: {', '.join(there)} "
                          "(docs/models.md: add a model)")
    return importlib.import_module(f"{__name__}.{name}")
