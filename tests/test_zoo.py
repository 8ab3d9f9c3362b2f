"""The model registry (pipeline/zoo/): every model module says the same things, and params.yaml's list is checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import config, zoo
from tests.helpers import ROOT, model_names, run_env, tiny_params


@pytest.mark.parametrize("name", zoo.available())
def test_every_model_module_says_what_the_pipeline_needs(name: str, defaults_file: Path) -> None:
    module = zoo.module(name)
    assert issubclass(module.Params, zoo.Block) and module.__doc__
    assert isinstance(module.X_LABEL, str) and module.X_LABEL
    assert module.CHECKPOINT_UNIT in ("epoch", "step")
    assert callable(module.train)
    cfg = config.load(defaults_file)
    if name in cfg.models:
        neutral = module.neutral(cfg.model(name), 14000)
        assert tuple(neutral) == tuple(p for p in zoo.NEUTRAL_PARAMS if p not in ("model", "parameters"))


def test_the_committed_params_list_models_that_have_modules(defaults_file: Path) -> None:
    assert config.load(defaults_file).models == list(model_names()) and set(model_names()) <= set(zoo.available())


def test_linear_gd_logs_its_full_batch_steps_as_what_they_are(defaults_file: Path) -> None:
    cfg = config.load(defaults_file)
    gd = zoo.module("linear_gd").neutral(cfg.model("linear_gd"), 14000)
    assert gd == {"optimizer": "gd (full batch)", "lr": cfg.model("linear_gd").lr, "batch_size": 14000,
                  "epochs": cfg.model("linear_gd").steps, "weight_decay": 0.0}


TYPO = model_names()[-1][0] + model_names()[-1][2] + model_names()[-1][1] + model_names()[-1][3:]  # two letters swapped


def _with(**changes: Any) -> dict[str, Any]:
    params = tiny_params()
    for key, value in changes.items():
        if value is None:
            params.pop(key)
        else:
            params[key] = value
    return params


@pytest.mark.bad_input
@pytest.mark.parametrize(("params", "expected"), [
    (_with(models=None), "models: missing; add the list of models to train"),
    (_with(models="mlp"), "models: got 'mlp'; must be a list of model names"),
    (_with(models=[*model_names(), "ridge"]), "models: no model module pipeline/zoo/ridge.py; there are: "),
    (_with(models=[*model_names(), TYPO]), f"models: no model module pipeline/zoo/{TYPO}.py (did you mean {model_names()[-1]!r}?)"),
    (_with(models=[*model_names(), model_names()[0]]), f"models: {model_names()[0]} listed twice"),
    (_with(models=list(model_names()[1:])), f"{model_names()[0]}: a model's block, but models does not list it"),
], ids=["missing", "not-a-list", "no-module", "typo", "twice", "block-not-listed"])
def test_a_bad_models_list_is_one_line(params: dict[str, Any], expected: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.parse(params)
    assert str(err.value).startswith(f"invalid params.yaml: {expected}"), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.bad_input
def test_a_listed_model_without_its_block_is_missing() -> None:
    params = tiny_params()
    params.pop(model_names()[-1])
    with pytest.raises(config.ConfigError, match=rf"invalid params.yaml: {model_names()[-1]}: missing"):
        config.parse(params)


@pytest.mark.bad_input
def test_training_a_model_params_yaml_does_not_list_is_one_line(tmp_path: Path) -> None:
    """`python -m stages train <model>`: a model not in the list stops after the params check, exit 2, nothing loaded."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    proc = subprocess.run([sys.executable, "-m", "stages", "train", "ridge"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=run_env(PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2
    assert proc.stderr == f"train@ridge: no model 'ridge' in params.yaml's models ({', '.join(model_names())})\n"
