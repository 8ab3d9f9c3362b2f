"""params.yaml -> validated, typed config objects.

This is the one module that knows the schema. Every stage loads its config here
first, before torch or mlflow are imported, so a typo in params.yaml costs the
user a fraction of a second and one readable line instead of a traceback.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline import config_errors
from pipeline.config_errors import Bad, ConfigError, Verbatim

MODEL_NAMES: tuple[str, ...] = ("linear_gd", "linear", "mlp")
PARAMS_FILE = "params.yaml"

Activation = Literal["relu", "gelu", "tanh", "silu"]
Optimizer = Literal["sgd", "adam", "adamw"]
Schedule = Literal["constant", "cosine", "step"]
Device = Literal["auto", "cpu", "cuda"]


class _Strict(BaseModel):
    """Forbid unknown keys (a typo must not be silently ignored), type coercion, and inf/nan."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class Split(_Strict):
    """Fractions of the rows that go to each split; they must sum to 1."""

    train: float = Field(gt=0, le=1)
    val: float = Field(gt=0, le=1)
    test: float = Field(gt=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> Split:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-9):
            shown = f"train {self.train:g} + val {self.val:g} + test {self.test:g} = {total:g}"
            raise Bad(None, Verbatim(shown), "the fractions must sum to 1")
        return self

    def sizes(self, n_samples: int) -> dict[str, int]:
        """Row counts per split; rounding leftovers go to train so they add up to n_samples."""
        val = int(n_samples * self.val)
        test = int(n_samples * self.test)
        return {"train": n_samples - val - test, "val": val, "test": test}


class DataConfig(_Strict):
    """The synthetic regression problem: y = X·w + b + nonlinearity·g(X) + noise."""

    n_samples: int = Field(gt=0)
    n_features: int = Field(gt=0)
    noise_std: float = Field(ge=0)
    nonlinearity: float = Field(ge=0)
    split: Split

    @model_validator(mode="after")
    def _nonempty_splits(self) -> DataConfig:
        if self.nonlinearity > 0 and self.n_features < 3:
            raise Bad("n_features", self.n_features, "must be at least 3 when data.nonlinearity > 0 (g uses x0, x1, x2)")
        empty = [k for k, v in self.split.sizes(self.n_samples).items() if v < 1]
        if empty:
            raise Bad("n_samples", self.n_samples, f"must be large enough to give every split a row ({', '.join(empty)} would be empty)")
        return self


class LinearGDConfig(_Strict):
    """Full-batch gradient descent written out by hand (the source notes' loop)."""

    steps: int = Field(gt=0)
    lr: float = Field(gt=0)


class LinearConfig(_Strict):
    """nn.Linear trained with a torch.optim optimizer over mini-batches."""

    optimizer: Optimizer
    lr: float = Field(gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(gt=0)
    epochs: int = Field(gt=0)


class DistributedConfig(_Strict):
    """Data-parallel training: nproc > 1 runs DistributedDataParallel over that many processes."""

    nproc: int = Field(default=1, ge=1)


class MLPConfig(_Strict):
    """A configurable MLP with early stopping on validation loss."""

    hidden: tuple[int, ...] = Field(min_length=1)
    activation: Activation
    dropout: float = Field(ge=0, lt=1)
    optimizer: Optimizer
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    schedule: Schedule
    batch_size: int = Field(gt=0)
    epochs: int = Field(gt=0)
    patience: int = Field(gt=0)
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _rows_for_every_rank(self) -> MLPConfig:
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
            raise Bad(None, list(v), "every width must be greater than 0")
        return v


class EvaluateConfig(_Strict):
    """How the evaluation reports."""

    plot_points: int = Field(gt=0)


class TrackingConfig(_Strict):
    """Where runs go; not a DVC dependency, so renaming the experiment reruns nothing."""

    experiment: str = Field(min_length=1)


class CheckpointConfig(_Strict):
    """How often training saves a checkpoint; not a DVC dependency: it changes no output, so editing it reruns nothing."""

    every_epochs: int = Field(default=1, ge=0)
    every_steps: int = Field(default=100, ge=0)
    min_seconds: float = Field(default=10.0, ge=0)


class Config(_Strict):
    """The whole of params.yaml."""

    seed: int = Field(ge=0)
    device: Device
    cuda_graph: bool
    mlflow: TrackingConfig
    data: DataConfig
    linear_gd: LinearGDConfig
    linear: LinearConfig
    mlp: MLPConfig
    evaluate: EvaluateConfig
    checkpoint: CheckpointConfig = CheckpointConfig()

    @model_validator(mode="after")
    def _batches_fit(self) -> Config:
        n_train = self.data.split.sizes(self.data.n_samples)["train"]
        for name in ("linear", "mlp"):
            batch = getattr(self, name).batch_size
            if batch > n_train:
                raise Bad(
                    f"{name}.batch_size", batch,
                    f"must be at most {n_train}, the rows in the train split (or raise data.n_samples)",
                )
        return self

    def model(self, name: str) -> LinearGDConfig | LinearConfig | MLPConfig:
        """The params block of one model, by name."""
        if name not in MODEL_NAMES:
            raise ConfigError(f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}")
        return getattr(self, name)


def parse(raw: Any) -> Config:
    """Validate an already-loaded params mapping; raise ConfigError listing every problem."""
    sections = ", ".join(Config.model_fields)
    if raw is None:
        raise ConfigError(f"{PARAMS_FILE} is empty; it must hold the sections {sections}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{PARAMS_FILE} must be a mapping of sections ({sections}), got {config_errors.show(raw)}")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = config_errors.describe(Config, exc.errors())
        if len(lines) == 1:
            raise ConfigError(f"invalid {PARAMS_FILE}: {lines[0]}") from None
        raise ConfigError(f"invalid {PARAMS_FILE} ({len(lines)} problems):\n  " + "\n  ".join(lines)) from None


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`), as DVC does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load(path: str | Path = PARAMS_FILE) -> Config:
    """Read and validate params.yaml."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse(raw)
