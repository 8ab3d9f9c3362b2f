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
from pipeline.errors import PipelineError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MODEL_NAMES: tuple[str, ...] = ("linear_gd", "linear", "mlp")
PARAMS_FILE = "params.yaml"

Activation = Literal["relu", "gelu", "tanh", "silu"]
Optimizer = Literal["sgd", "adam", "adamw"]
Schedule = Literal["constant", "cosine", "step"]
Device = Literal["auto", "cpu", "cuda"]


class ConfigError(PipelineError):
    """params.yaml is not usable; the message says which key, what value, what is allowed."""


class _Strict(BaseModel):
    """Forbid unknown keys (a typo must not be silently ignored) and type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Split(_Strict):
    """Fractions of the rows that go to each split; they must sum to 1."""

    train: float = Field(ge=0, le=1)
    val: float = Field(ge=0, le=1)
    test: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> Split:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-9):
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        if min(self.train, self.val, self.test) <= 0:
            raise ValueError("every split fraction must be > 0")
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
            raise ValueError("n_features must be >= 3 when nonlinearity > 0 (g uses x0, x1, x2)")
        empty = [k for k, v in self.split.sizes(self.n_samples).items() if v < 1]
        if empty:
            raise ValueError(f"n_samples={self.n_samples} leaves split(s) {empty} empty")
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
            raise ValueError(f"every hidden width must be > 0, got {list(v)}")
        return v


class EvaluateConfig(_Strict):
    """How the evaluation reports."""

    plot_points: int = Field(gt=0)


class TrackingConfig(_Strict):
    """Where runs go; not a DVC dependency, so renaming the experiment reruns nothing."""

    experiment: str = Field(min_length=1)


class Config(_Strict):
    """The whole of params.yaml."""

    seed: int = Field(ge=0)
    device: Device
    mlflow: TrackingConfig
    data: DataConfig
    linear_gd: LinearGDConfig
    linear: LinearConfig
    mlp: MLPConfig
    evaluate: EvaluateConfig

    @model_validator(mode="after")
    def _batches_fit(self) -> Config:
        n_train = self.data.split.sizes(self.data.n_samples)["train"]
        for name in ("linear", "mlp"):
            batch = getattr(self, name).batch_size
            if batch > n_train:
                raise ValueError(
                    f"{name}.batch_size={batch} is larger than the train split "
                    f"({n_train} rows); use at most {n_train} or raise data.n_samples"
                )
        return self

    def model(self, name: str) -> LinearGDConfig | LinearConfig | MLPConfig:
        """The params block of one model, by name."""
        if name not in MODEL_NAMES:
            raise ConfigError(f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}")
        return getattr(self, name)


def _describe(error: dict[str, Any]) -> str:
    """One line for one pydantic error: key, bad value, what is allowed."""
    key = ".".join(str(p) for p in error["loc"]) or "(top level)"
    kind, msg = error["type"], error["msg"]
    if kind == "missing":
        return f"{key}: missing (required)"
    if kind == "extra_forbidden":
        return f"{key}: unknown key (check the spelling; see params.yaml's comments for the allowed keys)"
    value = error.get("input")
    msg = msg.removeprefix("Value error, ")
    return f"{key}: got {value!r}; {msg}"


def parse(raw: Any) -> Config:
    """Validate an already-loaded params mapping; raise ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{PARAMS_FILE} must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ConfigError(f"invalid {PARAMS_FILE}:\n  " + "\n  ".join(lines)) from None


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
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse(raw)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested params -> {'mlp.lr': 0.01, ...}, the form MLflow shows as columns."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def stage_params(config: Config, stage: str) -> dict[str, Any]:
    """The params a stage depends on (mirrors dvc.yaml's `params:`), flattened for logging."""
    dump = config.model_dump()
    shared = {"seed": dump["seed"], "device": dump["device"]}
    if stage == "generate":
        return flatten({"seed": dump["seed"], "data": dump["data"]})
    if stage == "evaluate":
        return flatten({"evaluate": dump["evaluate"]})
    model = stage.removeprefix("train@")
    return flatten({**shared, model: dump[model]})
