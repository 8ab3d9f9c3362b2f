"""params.yaml -> validated, typed config objects.

This is the one module that knows the schema. Every stage loads its config here
first, before torch or mlflow are imported, so a typo in params.yaml costs the
user a fraction of a second and one readable line instead of a traceback.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from pipeline import config_errors, zoo
from pipeline.config_errors import ConfigError, InvalidValue, Unquoted

PARAMS_FILE = "params.yaml"

# Upper bounds on everything that sizes work, so no value can exhaust the machine before a check
# catches it (params.yaml's comments state them too). The data's disk and memory footprint is
# checked against this machine by data.check_fits before generate draws a row.
MAX_PARAMS_BYTES = 128 * 1024  # the committed file is ~4 KiB; 128 KiB of YAML parses in ~0.3 s on a busy CPU
MAX_SAMPLES = 1_000_000_000
MAX_FEATURES = 10_000
MAX_PLOT_POINTS = 100_000      # evaluate.plot_points
MAX_NAME = 250                 # mlflow.experiment, characters
MAX_WAIT = 3600                # mlflow.wait_seconds
MAX_INTERVAL = 3600            # mlflow.flush_seconds, mlflow.system_metrics_seconds

Device = Literal["auto", "cpu", "cuda"]
_Strict = zoo.Block  # every section of params.yaml, the models' blocks too: unknown keys, coercion, inf/nan refused


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
            raise InvalidValue(None, Unquoted(shown), "the fractions must sum to 1")
        return self

    def sizes(self, n_samples: int) -> dict[str, int]:
        """Row counts per split; rounding leftovers go to train so they add up to n_samples."""
        val = int(n_samples * self.val)
        test = int(n_samples * self.test)
        return {"train": n_samples - val - test, "val": val, "test": test}


class DataConfig(_Strict):
    """The synthetic regression problem: y = X·w + b + nonlinearity·g(X) + noise."""

    n_samples: int = Field(gt=0, le=MAX_SAMPLES)
    n_features: int = Field(gt=0, le=MAX_FEATURES)
    noise_std: float = Field(ge=0)
    nonlinearity: float = Field(ge=0)
    split: Split

    @model_validator(mode="after")
    def _nonempty_splits(self) -> DataConfig:
        if self.nonlinearity > 0 and self.n_features < 3:
            raise InvalidValue("n_features", self.n_features, "must be at least 3 when data.nonlinearity > 0 (g uses x0, x1, x2)")
        empty = [k for k, v in self.split.sizes(self.n_samples).items() if v < 1]
        if empty:
            raise InvalidValue("n_samples", self.n_samples, f"must be large enough to give every split a row ({', '.join(empty)} would be empty)")
        return self


class EvaluateConfig(_Strict):
    """How the evaluation reports."""

    plot_points: int = Field(gt=0, le=MAX_PLOT_POINTS)


class TrackingConfig(_Strict):
    """Where runs go; only dvc.yaml's params check depends on it, so renaming the experiment retrains nothing."""

    experiment: str = Field(min_length=1, max_length=MAX_NAME)
    wait_seconds: float = Field(default=60.0, ge=0, le=MAX_WAIT)  # a server down at a stage's start is asked again this long
    # a training run's curves and progress are sent at most this often while it trains; 0: at its end only
    flush_seconds: float = Field(default=5.0, ge=0, le=MAX_INTERVAL)
    system_metrics: bool = True  # MLflow's system metrics (CPU, memory, disk, network; GPU) on every training run
    system_metrics_seconds: float = Field(default=10.0, ge=1, le=MAX_INTERVAL)  # how often they are sampled


class CheckpointConfig(_Strict):
    """How often training saves a checkpoint; it changes no output and only the params check depends on it: editing
    it retrains nothing."""

    every_epochs: int = Field(default=1, ge=0)
    every_steps: int = Field(default=100, ge=0)
    min_seconds: float = Field(default=10.0, ge=0)


SEARCH_KINDS = ("int", "float", "log", "choice")
PRUNERS = ("median", "halving", "none")


class SearchRange(_Strict):
    """One searched key: exactly one of int/float/log ([low, high], log-uniform for `log`) or choice (a list)."""

    # dumped as written (`int`, `float`): a dumped config parses back (the benchmark and tests edit dumps)
    model_config = ConfigDict(_Strict.model_config, serialize_by_alias=True)

    int_: tuple[int, int] | None = Field(default=None, alias="int")
    float_: tuple[float, float] | None = Field(default=None, alias="float")
    log: tuple[float, float] | None = None
    choice: list[Any] | None = Field(default=None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _known_kinds(cls, v: Any) -> Any:
        unknown = [k for k in v if k not in SEARCH_KINDS] if isinstance(v, dict) else []
        if unknown:
            hint = difflib.get_close_matches(str(unknown[0]), SEARCH_KINDS, n=1)
            guess = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise InvalidValue(None, Unquoted(str(unknown[0])), f"unknown kind of range{guess}; allowed: {', '.join(SEARCH_KINDS)}")
        return v

    @field_validator("float_", "log", mode="before")
    @classmethod
    def _pair(cls, v: Any) -> Any:
        if isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            return tuple(float(x) for x in v)  # `[0, 0.3]`: an int end of a float range is fine
        return tuple(v) if isinstance(v, list) else v

    @field_validator("int_", mode="before")
    @classmethod
    def _int_pair(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v

    @model_validator(mode="after")
    def _one_kind(self) -> SearchRange:
        given = [k for k in SEARCH_KINDS if self.bounds(k) is not None]
        if len(given) != 1:
            shown = Unquoted(", ".join(given) or "none of them")
            raise InvalidValue(None, shown, f"give exactly one of {', '.join(SEARCH_KINDS)}, e.g. {{log: [1.0e-4, 1.0e-2]}}")
        kind = given[0]
        if kind != "choice":
            low, high = self.bounds(kind)  # type: ignore[misc]
            if not low < high:
                raise InvalidValue(kind, [low, high], "an empty or inverted range: must be [low, high] with low < high")
            if kind == "log" and low <= 0:
                raise InvalidValue(kind, [low, high], "a log range must be above 0 (use float for a range that starts at 0)")
        return self

    def bounds(self, kind: str) -> Any:
        """The value given for `kind` (int/float/log/choice), None when absent."""
        return getattr(self, {"int": "int_", "float": "float_"}.get(kind, kind))

    @property
    def kind(self) -> str:
        """Which of int/float/log/choice this range is."""
        return next(k for k in SEARCH_KINDS if self.bounds(k) is not None)


class PrunerConfig(_Strict):
    """Stops trials that cannot win, from the per-epoch validation loss a trial's training reports."""

    kind: Literal["median", "halving", "none"]
    startup_trials: int = Field(default=3, ge=0)   # median: trials finished before any is pruned
    warmup_epochs: int = Field(default=5, ge=0)    # median: epochs of a trial before it can be pruned
    min_epochs: int = Field(default=1, ge=1)       # halving: epochs before the first rung


class SearchConfig(_Strict):
    """`./tasks.sh search`: the space an Optuna study draws from. Only the params check depends on it (editing it
    retrains nothing)."""

    space: dict[str, SearchRange] = Field(min_length=1)
    pruner: PrunerConfig = PrunerConfig(kind="median")

    @property
    def model(self) -> str:
        """The model a search tunes: the block its keys are in (one per search; Config checks it)."""
        return next(iter(self.space)).partition(".")[0]


class Config(_Strict):
    """The whole of params.yaml: the sections every pipeline has, and (in `config_class`'s subclass) a block per model
    that `models` lists."""

    seed: int = Field(ge=0)
    device: Device
    cuda_graph: bool
    mlflow: TrackingConfig
    data: DataConfig
    models: list[str]
    evaluate: EvaluateConfig
    checkpoint: CheckpointConfig = CheckpointConfig()
    search: SearchConfig | None = None

    @model_validator(mode="after")
    def _search_keys(self) -> Config:
        """Every searched key is a key of a model's block, and every value its range can give is a valid value there."""
        for key, rng in (self.search.space.items() if self.search else ()):
            check_search_value(self, key, rng)
        blocks = sorted({key.partition(".")[0] for key in (self.search.space if self.search else ())})
        if len(blocks) > 1:  # a trial's objective is one model's val loss
            raise InvalidValue("search.space", Unquoted(f"keys of {', '.join(blocks)}"),
                               "keys of one model's block: a search tunes one model")
        return self

    @model_validator(mode="after")
    def _models_fit_the_data(self) -> Config:
        n_train = self.data.split.sizes(self.data.n_samples)["train"]
        for name in self.models:
            try:
                self.model(name).check(self.data.n_features, n_train)
            except InvalidValue as bad:
                raise InvalidValue(f"{name}.{bad.key}", bad.value, bad.allowed) from None
        return self

    def model(self, name: str) -> zoo.Block:
        """The params block of one listed model, by name."""
        if name not in self.models:
            raise ConfigError(f"model {name!r} is not in {PARAMS_FILE}'s models: {', '.join(self.models)}")
        return getattr(self, name)


@functools.cache
def config_class(models: tuple[str, ...]) -> type[Config]:
    """Config with a required block per listed model, its schema the `Params` of the model's module (pipeline/zoo/)."""
    blocks: dict[str, Any] = {name: (zoo.module(name).Params, ...) for name in models}
    return create_model("Config", __base__=Config, __doc__=Config.__doc__, **blocks)


def _listed_models(raw: dict[str, Any]) -> tuple[str, ...]:
    """params.yaml's `models`, checked: a list of distinct names, each with a module; every model block listed."""
    names = raw.get("models")
    example = f"e.g. [{', '.join(zoo.available())}] (the modules in pipeline/zoo/)"
    if names is None:
        raise ConfigError(f"invalid {PARAMS_FILE}: models: missing; add the list of models to train, {example}")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise ConfigError(f"invalid {PARAMS_FILE}: models: got {config_errors.show(names)}; must be a list of model "
                          f"names, {example}")
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"invalid {PARAMS_FILE}: models: {', '.join(twice)} listed twice; list each model once")
    for name in names:
        try:
            zoo.module(name)
        except ConfigError as exc:
            raise ConfigError(f"invalid {PARAMS_FILE}: {exc}") from None
    unlisted = [k for k in raw if k not in Config.model_fields and k not in names and k in zoo.available()]
    if unlisted:
        raise ConfigError(f"invalid {PARAMS_FILE}: {unlisted[0]}: a model's block, but models does not list it; "
                          f"add it to models ({', '.join(names)}) or delete the block")
    return tuple(names)


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


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key ('mlp.lr') in a nested params mapping, in place: what `flatten` names, written back."""
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree[part]
    tree[leaf] = value


def searchable_keys(cfg: Config) -> list[str]:
    """Every dotted key a search may set: the leaves of the listed models' blocks."""
    return [k for block in cfg.models for k in flatten({block: cfg.model(block).model_dump()})]


def check_search_value(cfg: Config, key: str, rng: SearchRange) -> None:
    """Raise InvalidValue (pinned to search.space.<key>) unless `key` is searchable and each end/choice is valid for it."""
    where = f"search.space.{key}"
    allowed = searchable_keys(cfg)
    if key not in allowed:
        hint = difflib.get_close_matches(key, allowed, n=1)
        guess = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise InvalidValue(where, Unquoted("an unknown key"), f"not a key of a model's block{guess}; allowed: {', '.join(allowed)}")
    block, _, leaf = key.partition(".")
    model = type(getattr(cfg, block))
    values = rng.choice if rng.kind == "choice" else list(rng.bounds(rng.kind))
    for value in values:
        tree = getattr(cfg, block).model_dump()
        set_dotted(tree, leaf, value)
        try:
            model.model_validate(tree)
        except ValidationError as exc:
            line = config_errors.describe(model, exc.errors())[0]
            what = "choice" if rng.kind == "choice" else f"{rng.kind} range end"
            raise InvalidValue(where, value, f"this {what} is not a valid {key} ({line.split('; ', 1)[-1]})") from None


def parse(raw: Any) -> Config:
    """Validate an already-loaded params mapping; raise ConfigError listing every problem."""
    sections = ", ".join(Config.model_fields)
    if raw is None:
        raise ConfigError(f"{PARAMS_FILE} is empty; it must hold the sections {sections}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{PARAMS_FILE} must be a mapping of sections ({sections}), got {config_errors.show(raw)}")
    schema = config_class(_listed_models(raw))
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        lines = config_errors.describe(schema, exc.errors())
        if len(lines) == 1:
            raise ConfigError(f"invalid {PARAMS_FILE}: {lines[0]}") from None
        raise ConfigError(f"invalid {PARAMS_FILE} ({len(lines)} problems):\n  " + "\n  ".join(lines)) from None


SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's when present: 5-15x faster than Python's


class _Loader(SafeLoader):  # type: ignore[misc,valid-type]
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


def _refuse_reused_nodes(path: Path, root: yaml.Node | None) -> None:
    """Refuse what YAML loaders accept quietly, found in one pass over the composed nodes, before anything is built.

    An alias (&name, *name) is the graph pointing at one node again, found with a `seen` set in time
    linear in the file, where expanding an alias bomb would take exponential time. A key given twice
    in one mapping would keep its last value here, while `dvc repro` refuses the file: refused here too,
    so a stage run directly and DVC agree.
    """
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")] if root is not None else []
    while stack:
        node, where = stack.pop()
        if id(node) in seen:
            raise ConfigError(
                f"{path}: the value at line {node.start_mark.line + 1} is reused through a YAML anchor and alias "
                "(&name, *name); aliases are not allowed in params.yaml (they can expand without bound), write the value out"
            )
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((item, where) for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                name = f"{where}{key.value}" if isinstance(key, yaml.ScalarNode) else f"{where}?"
                if isinstance(key, yaml.ScalarNode) and name in first:
                    raise ConfigError(
                        f"{path}: key {name!r} is given twice (lines {first[name]} and {key.start_mark.line + 1}); "
                        "a key may appear once in its section: delete one of them"
                    )
                first[name] = key.start_mark.line + 1
                stack.extend([(key, where), (value, f"{name}.")])


def _read_yaml(path: Path, text: str) -> Any:
    """Parse params.yaml into plain values, refusing YAML aliases and duplicate keys before values are built."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        _refuse_reused_nodes(path, root)
        return loader.construct_document(root) if root is not None else None
    finally:
        loader.dispose()


def load(path: str | Path = PARAMS_FILE) -> Config:
    """Read and validate params.yaml; refuse, before parsing, a file too large to be a params file."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw_bytes = fh.read(MAX_PARAMS_BYTES + 1)  # never more: a 50 MB file costs no time or memory
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw_bytes) > MAX_PARAMS_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_PARAMS_BYTES // 1024} KiB ({path.stat().st_size} bytes); "
            "a params file is a few KiB, remove the long value"
        )
    try:
        text = raw_bytes.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        raw = _read_yaml(path, text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {config_errors.show(str(exc))}") from None
    return parse(raw)
