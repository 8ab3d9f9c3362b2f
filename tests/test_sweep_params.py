"""`dvc exp run -S key=value` edits params.yaml; the result must load as the config the stages expect."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from dvc.utils.hydra import (
    apply_overrides,  # what `dvc exp run -S` / `--queue -S` call on params.yaml
)

from pipeline import config, dvc_params
from tests.helpers import ROOT


@pytest.fixture
def params(tmp_path: Path, defaults_file: Path) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copy(defaults_file, path)
    return path


@pytest.mark.parametrize(
    ("override", "hidden"), [("mlp.hidden=[32]", (32,)), ("mlp.hidden=[64,64]", (64, 64)), ("mlp.hidden=[8, 4, 2]", (8, 4, 2))]
)
def test_hidden_list_round_trips(params: Path, override: str, hidden: tuple[int, ...]) -> None:
    apply_overrides(str(params), [override, "mlp.lr=1e-3", "linear.lr=1"])
    cfg = config.load(params)
    assert cfg.mlp.hidden == hidden and all(type(w) is int for w in cfg.mlp.hidden)
    assert cfg.mlp.lr == 0.001 and cfg.linear.lr == 1.0
    assert dvc_params.stage_params(cfg, "train@mlp", ROOT / "dvc.yaml")["mlp.hidden"] == list(hidden)  # logged to MLflow as a list
    assert "# width of each hidden layer" in params.read_text()  # DVC keeps the comments


def test_bare_width_is_a_one_line_error(params: Path) -> None:
    apply_overrides(str(params), ["mlp.hidden=32"])
    with pytest.raises(config.ConfigError) as exc:
        config.load(params)
    assert str(exc.value) == (
        "invalid params.yaml: mlp.hidden: got 32; must be a list of layer widths, "
        "e.g. [32] (dvc exp run -S 'mlp.hidden=[32]') or [64, 64]"
    )
