"""params.yaml -> validated, typed config objects.

This is the one module that knows the schema. Every stage loads its config here
first, before torch or mlflow are imported, so a typo in params.yaml costs the
user a fraction of a second and one readable line instead of a traceback.
"""

from __future__ import annotations

import difflib
import math
import re
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pipeline.errors import PipelineError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MODEL_NAMES: tuple[str, ...] = ("linear_gd", "linear", "mlp")
PARAMS_FILE = "params.yaml"
DVC_FILE = "dvc.yaml"

Activation = Literal["relu", "gelu", "tanh", "silu"]
Optimizer = Literal["sgd", "adam", "adamw"]
Schedule = Literal["constant", "cosine", "step"]
Device = Literal["auto", "cpu", "cuda"]


class ConfigError(PipelineError):
    """params.yaml is not usable; the message says which key, what value, what is allowed."""


class _Bad(ValueError):
    """A cross-field problem pinned to the key the user should edit (relative to the section)."""

    def __init__(self, key: str | None, value: Any, allowed: str) -> None:
        super().__init__(f"{key or '(section)'}: got {value!r}; {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


class _Verbatim(str):
    """A value shown as written (no quotes), e.g. a sum spelled out."""

    def __repr__(self) -> str:
        return str(self)


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
            raise _Bad(None, _Verbatim(shown), "the fractions must sum to 1")
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
            raise _Bad("n_features", self.n_features, "must be at least 3 when data.nonlinearity > 0 (g uses x0, x1, x2)")
        empty = [k for k, v in self.split.sizes(self.n_samples).items() if v < 1]
        if empty:
            raise _Bad("n_samples", self.n_samples, f"must be large enough to give every split a row ({', '.join(empty)} would be empty)")
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
            raise _Bad(None, list(v), "every width must be greater than 0")
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
    cuda_graph: bool
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
                raise _Bad(
                    f"{name}.batch_size", batch,
                    f"must be at most {n_train}, the rows in the train split (or raise data.n_samples)",
                )
        return self

    def model(self, name: str) -> LinearGDConfig | LinearConfig | MLPConfig:
        """The params block of one model, by name."""
        if name not in MODEL_NAMES:
            raise ConfigError(f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}")
        return getattr(self, name)


_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60


def _show(value: Any) -> str:
    """The bad value as the user wrote it, kept short."""
    return _short.repr(list(value) if isinstance(value, tuple) else value)


def _section_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the section that holds `loc` (for 'did you mean')."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _meant(loc: tuple[Any, ...]) -> str | None:
    """The allowed key closest to an unknown one, if any is close (a likely typo)."""
    hint = difflib.get_close_matches(str(loc[-1]), _section_keys(loc), n=1)
    return hint[0] if hint else None


def _allowed(error: dict[str, Any]) -> str:
    """pydantic's 'Input should be …' as 'must be …', with plainer words for list/section types."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "tuple_type":
        return "must be a list, e.g. [64, 64]"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length', 1)} item(s)"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return "must be a section (a mapping of keys)"
    return error["msg"].removeprefix("Value error, ").replace("Input should be", "must be")


def _describe(error: dict[str, Any]) -> str:
    """One line for one pydantic error: key, bad value, what is allowed."""
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc)
    kind = error["type"]
    if kind == "missing":
        return f"{key}: missing; add it (params.yaml's comments list every key)"
    if kind == "extra_forbidden":
        section = ".".join(str(p) for p in loc[:-1])
        hint = _meant(loc)
        guess = f" (did you mean {hint!r}?)" if hint else ""
        return f"{key}: unknown key{guess}; allowed in {section or 'the top level'}: {', '.join(_section_keys(loc))}"
    bad = (error.get("ctx") or {}).get("error")
    if isinstance(bad, _Bad):
        full = ".".join(filter(None, [key, bad.key]))
        return f"{full}: got {_show(bad.value)}; {bad.allowed}"
    return f"{key}: got {_show(error.get('input'))}; {_allowed(error)}"


def _merge_typos(errors: list[Any]) -> list[Any]:
    """A renamed key (`lrr:` for `lr:`) is one mistake: keep 'unknown key, did you mean' and drop 'missing'."""
    extra = [tuple(e["loc"]) for e in errors if e["type"] == "extra_forbidden"]
    meant = {loc[:-1] + (hint,) for loc in extra if (hint := _meant(loc))}
    return [e for e in errors if not (e["type"] == "missing" and tuple(e["loc"]) in meant)]


def parse(raw: Any) -> Config:
    """Validate an already-loaded params mapping; raise ConfigError listing every problem."""
    sections = ", ".join(Config.model_fields)
    if raw is None:
        raise ConfigError(f"{PARAMS_FILE} is empty; it must hold the sections {sections}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{PARAMS_FILE} must be a mapping of sections ({sections}), got {_show(raw)}")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e) for e in _merge_typos(exc.errors())]
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


def stage_param_keys(stage: str, dvc_file: str | Path = DVC_FILE) -> list[str]:
    """The `params:` keys dvc.yaml lists for a stage (`train@mlp` resolves the foreach item): one source."""
    path = Path(dvc_file)
    try:
        stages = yaml.safe_load(path.read_text())["stages"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read the stages of {path}: {exc}") from None
    name, _, item = stage.partition("@")
    block = stages.get(name) if isinstance(stages, dict) else None
    if item and isinstance(block, dict):
        block = block.get("do")
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: no stage {stage!r}; stages there: {', '.join(stages or [])}")
    keys = block.get("params", [])
    if not all(isinstance(k, str) for k in keys):
        raise ConfigError(f"{path}: stage {stage!r}: params must be keys of {PARAMS_FILE}, e.g. `- mlp`, got {keys!r}")
    return [k.replace("${item}", item) for k in keys]


def stage_params(config: Config, stage: str, dvc_file: str | Path = DVC_FILE) -> dict[str, Any]:
    """The params a stage depends on (its `params:` in dvc.yaml), flattened for logging to MLflow."""
    dump = config.model_dump()
    flat: dict[str, Any] = {}
    for key in stage_param_keys(stage, dvc_file):
        node: Any = dump
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"{dvc_file}: stage {stage!r} lists param {key!r}, which {PARAMS_FILE} does not have")
            node = node[part]
        flat.update(flatten({key: node}))
    return flat
