"""params.yaml validation: every bad input gives one line naming the key, the value and what is allowed.

The schema cases run in-process (milliseconds each); a few run the real stage entry
points in a subprocess to show the error comes before torch or mlflow are imported.
tests/test_robustness_params.py runs a handful of them through the real `dvc repro`.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import config, dvc_params
from tests.helpers import ROOT, run_env, tiny_params

DELETE = object()  # marks a key to remove


def _edit(params: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    params = copy.deepcopy(params)
    *parents, leaf = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return params


# (edited key, bad value, fragments the message must contain: key, bad value, what is allowed)
BAD_PARAMS: list[tuple[str, Any, tuple[str, ...]]] = [
    ("mlp.lrr", 0.1, ("mlp.lrr: unknown key", "did you mean 'lr'", "allowed in mlp: hidden,")),
    ("data.n_sample", 10, ("data.n_sample: unknown key", "did you mean 'n_samples'")),
    ("seeed", 1, ("seeed: unknown key", "did you mean 'seed'", "allowed in the top level: seed,")),
    ("linear.epochs", "ten", ("linear.epochs: got 'ten'", "must be a valid integer")),
    ("mlp.epochs", 3.5, ("mlp.epochs: got 3.5", "must be a valid integer")),
    ("mlp.lr", "fast", ("mlp.lr: got 'fast'", "must be a valid number")),
    ("mlp.lr", True, ("mlp.lr: got True", "must be a valid number")),
    ("mlp.hidden", 64, ("mlp.hidden: got 64", "must be a list")),
    ("mlp", 5, ("mlp: got 5", "must be a section")),
    ("mlp.lr", 0, ("mlp.lr: got 0", "must be greater than 0")),
    ("mlp.lr", float("inf"), ("mlp.lr: got inf", "must be a finite number")),
    ("data.noise_std", float("nan"), ("data.noise_std: got nan", "must be a finite number")),
    ("linear.lr", -0.1, ("linear.lr: got -0.1", "must be greater than 0")),
    ("linear_gd.lr", 0.0, ("linear_gd.lr: got 0.0", "must be greater than 0")),
    ("linear.epochs", 0, ("linear.epochs: got 0", "must be greater than 0")),
    ("mlp.epochs", -3, ("mlp.epochs: got -3", "must be greater than 0")),
    ("linear_gd.steps", 0, ("linear_gd.steps: got 0", "must be greater than 0")),
    ("linear.batch_size", 0, ("linear.batch_size: got 0", "must be greater than 0")),
    ("mlp.batch_size", -64, ("mlp.batch_size: got -64", "must be greater than 0")),
    ("mlp.patience", 0, ("mlp.patience: got 0", "must be greater than 0")),
    ("data.n_samples", 0, ("data.n_samples: got 0", "must be greater than 0")),
    ("data.n_features", 0, ("data.n_features: got 0", "must be greater than 0")),
    ("mlp.hidden", [8, 0], ("mlp.hidden: got [8, 0]", "every width must be greater than 0")),
    ("mlp.hidden", [], ("mlp.hidden: got []", "at least 1 item")),
    ("data.noise_std", -1.0, ("data.noise_std: got -1.0", "must be greater than or equal to 0")),
    ("data.nonlinearity", -0.5, ("data.nonlinearity: got -0.5", "must be greater than or equal to 0")),
    ("mlp.dropout", 1.0, ("mlp.dropout: got 1.0", "must be less than 1")),
    ("mlflow.flush_seconds", -1, ("mlflow.flush_seconds: got -1", "must be greater than or equal to 0")),
    ("mlflow.system_metrics_seconds", 0.5, ("mlflow.system_metrics_seconds: got 0.5", "greater than or equal to 1")),
    ("mlp.dropout", -0.1, ("mlp.dropout: got -0.1", "must be greater than or equal to 0")),
    ("mlp.weight_decay", -1.0, ("mlp.weight_decay: got -1.0", "must be greater than or equal to 0")),
    ("data.split.train", -0.1, ("data.split.train: got -0.1", "must be greater than 0")),
    ("data.split.val", 0.0, ("data.split.val: got 0.0", "must be greater than 0")),
    ("data.split.train", 0.5, ("data.split: got train 0.5 + val 0.15 + test 0.15 = 0.8", "must sum to 1")),
    ("data.split.test", 0.3, ("data.split: got train 0.7 + val 0.15 + test 0.3 = 1.15", "must sum to 1")),
    ("linear.batch_size", 10_000, ("linear.batch_size: got 10000", "must be at most 420", "train split")),
    ("mlp.batch_size", 421, ("mlp.batch_size: got 421", "must be at most 420")),
    ("data.n_samples", 3, ("data.n_samples: got 3", "every split a row", "val, test would be empty")),
    ("data.n_features", 2, ("data.n_features: got 2", "at least 3 when data.nonlinearity > 0")),
    ("mlp.activation", "relu6", ("mlp.activation: got 'relu6'", "'relu', 'gelu', 'tanh' or 'silu'")),
    ("mlp.optimizer", "lbfgs", ("mlp.optimizer: got 'lbfgs'", "'sgd', 'adam' or 'adamw'")),
    ("linear.optimizer", "Adam", ("linear.optimizer: got 'Adam'", "'sgd', 'adam' or 'adamw'")),
    ("mlp.schedule", "linear", ("mlp.schedule: got 'linear'", "'constant', 'cosine' or 'step'")),
    ("device", "tpu", ("device: got 'tpu'", "'auto', 'cpu' or 'cuda'")),
    ("evaluate", DELETE, ("evaluate: missing",)),
    ("mlflow", DELETE, ("mlflow: missing",)),
    ("mlp.lr", DELETE, ("mlp.lr: missing",)),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("key", "value", "expected"), BAD_PARAMS, ids=[f"{k}={'(deleted)' if v is DELETE else repr(v)}" for k, v, _ in BAD_PARAMS])
def test_bad_params_named_in_one_line(key: str, value: Any, expected: tuple[str, ...]) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.parse(_edit(tiny_params(), key, value))
    message = str(err.value)
    assert "\n" not in message, message
    assert message.startswith("invalid params.yaml: ")
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.bad_input
def test_several_problems_are_listed_together() -> None:
    params = _edit(_edit(tiny_params(), "mlp.lr", -1), "linear.epochs", "ten")
    with pytest.raises(config.ConfigError) as err:
        config.parse(params)
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid params.yaml (2 problems):"
    assert {line.split(":")[0].strip() for line in lines[1:]} == {"linear.epochs", "mlp.lr"}


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("seed: [1\n", "not valid YAML at line 2, column 1"),
        ("seed: 1\n  device: cpu\n", "not valid YAML at line 2"),
        ("", "params.yaml is empty"),
        ("- seed\n- device\n", "must be a mapping of sections (seed, device,"),
    ],
    ids=["unclosed-list", "bad-indent", "empty", "not-a-mapping"],
)
def test_unreadable_params_file(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.bad_input
def test_missing_params_file(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"cannot read .*params.yaml: No such file"):
        config.load(tmp_path / "params.yaml")


def test_repository_params_are_valid(defaults_file: Path) -> None:
    cfg = config.load(defaults_file)
    assert cfg.model("mlp").hidden == (64, 64)


def test_yaml_exponent_without_dot_is_a_float(tmp_path: Path) -> None:
    params = tiny_params()
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params).replace("lr: 0.003", "lr: 3e-3"))
    assert config.load(path).mlp.lr == pytest.approx(3e-3)


STAGES = [["stages", "generate"], ["stages", "train", "mlp"], ["stages", "evaluate"], ["stages", "params"]]


@pytest.mark.bad_input
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s[-1])
def test_stage_stops_before_heavy_imports(tmp_path: Path, stage: list[str]) -> None:
    """The real entry point: exit 2, one line, no traceback, nothing written, torch/mlflow never imported."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_edit(tiny_params(), "mlp.lrr", 0.1)))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    env = run_env(PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", *stage], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "pydantic" in imported  # the import log is really there
    assert not imported & {"torch", "mlflow", "numpy", "pyarrow"}, sorted(imported & {"torch", "mlflow", "numpy", "pyarrow"})
    messages = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert len(messages) == 1 and "Traceback" not in proc.stderr
    assert "invalid params.yaml: mlp.lrr: unknown key (did you mean 'lr'?)" in messages[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.bad_input
def test_renamed_key_is_one_problem() -> None:
    """`lrr:` instead of `lr:` is reported once, as the typo, not also as 'mlp.lr: missing'."""
    params = tiny_params()
    params["mlp"]["lrr"] = params["mlp"].pop("lr")
    with pytest.raises(config.ConfigError) as err:
        config.parse(params)
    assert str(err.value).startswith("invalid params.yaml: mlp.lrr: unknown key (did you mean 'lr'?)")
    assert "missing" not in str(err.value)


def test_stage_params_come_from_dvc_yaml(tmp_path: Path, defaults_file: Path) -> None:
    """What a stage logs to MLflow is its `params:` list in dvc.yaml, foreach item resolved: nothing restated."""
    cfg = config.load(defaults_file)
    dvc_file = tmp_path / "dvc.yaml"
    dvc_file.write_text(yaml.safe_dump({"stages": {
        "generate": {"cmd": "x", "params": ["data.split"]},
        "train": {"foreach": ["mlp"], "do": {"cmd": "x", "params": ["device", "${item}.lr"]}},
    }}))
    assert dvc_params.stage_params(cfg, "generate", dvc_file) == {"data.split.train": 0.7, "data.split.val": 0.15,
                                                               "data.split.test": 0.15}
    assert dvc_params.stage_params(cfg, "train@mlp", dvc_file) == {"device": "auto", "mlp.lr": cfg.mlp.lr}
    with pytest.raises(config.ConfigError, match=r"no stage 'evaluate'; stages there: generate, train"):
        dvc_params.stage_params(cfg, "evaluate", dvc_file)
    dvc_file.write_text(yaml.safe_dump({"stages": {"generate": {"cmd": "x", "params": ["data.rows"]}}}))
    with pytest.raises(config.ConfigError, match=r"lists param 'data.rows', which params.yaml does not have"):
        dvc_params.stage_params(cfg, "generate", dvc_file)


def _duplicated(text: str, block: str, line: str) -> str:
    """`text` (a dumped params.yaml) with `line` added as the first line of the top-level `block:`."""
    return text.replace(f"\n{block}:\n", f"\n{block}:\n{line}\n", 1) if block else f"{line}\n{text}"


DUPLICATES = [  # (section, the added line, the key named)
    ("mlp", "  lr: 0.5", "mlp.lr"),
    ("", "seed: 7", "seed"),
    ("data", "  split: {train: 0.8, val: 0.1, test: 0.1}", "data.split"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("block", "line", "key"), DUPLICATES, ids=[d[2] for d in DUPLICATES])
def test_key_given_twice_is_refused_in_one_line(tmp_path: Path, block: str, line: str, key: str) -> None:
    """YAML loaders keep the last of two equal keys and `dvc repro` refuses the file: a stage refuses it too."""
    text = yaml.safe_dump(tiny_params())
    path = tmp_path / "params.yaml"
    path.write_text(_duplicated(text, block, line))
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    message = str(err.value)
    found = re.fullmatch(rf"{re.escape(str(path))}: key '{re.escape(key)}' is given twice \(lines (\d+) and (\d+)\); "
                         r"a key may appear once in its section: delete one of them", message)
    assert found, message
    written = path.read_text().splitlines()
    leaf = key.rsplit(".", 1)[-1]
    assert [written[int(n) - 1].strip().split(":")[0] for n in found.groups()] == [leaf, leaf]
    path.write_text(text)
    config.load(path)  # the same file without the added line loads


@pytest.mark.bad_input
def test_key_given_twice_stops_a_stage_run_directly(tmp_path: Path) -> None:
    """`python -m stages train mlp` by hand: exit 2 and the one line, before training with either value."""
    (tmp_path / "params.yaml").write_text(_duplicated(yaml.safe_dump(tiny_params()), "mlp", "  lr: 0.5"))
    proc = subprocess.run([sys.executable, "-m", "stages", "train", "mlp"], cwd=tmp_path, env=run_env(PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("train@mlp: params.yaml: key 'mlp.lr' is given twice (lines ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
