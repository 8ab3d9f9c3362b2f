"""The default params teach what the README promises: the scores of the run's `dvc repro` at the committed defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import config, dvc_params
from tests.helpers import ROOT

DVC_FILE = ROOT / "dvc.yaml"


@pytest.fixture(scope="module")
def default_scores(default_repro: Path) -> dict:
    """Each model's and reference's scores (metrics/evaluation/*.json) after a default `dvc repro`."""
    return {p.stem: json.loads(p.read_text()) for p in (default_repro / "metrics" / "evaluation").glob("*.json")}


def test_linear_models_land_within_one_percent_of_least_squares(default_scores: dict) -> None:
    for name in ("linear_gd", "linear"):
        assert default_scores[name]["ratio_to_least_squares"] < 1.01, name


def test_mlp_lands_within_ten_percent_of_the_noise_floor_and_beats_the_lines(default_scores: dict) -> None:
    mlp = default_scores["mlp"]
    assert mlp["ratio_to_noise_floor"] < 1.10
    assert mlp["test_mse"] < 0.75 * default_scores["linear"]["test_mse"]


def test_least_squares_sits_nonlinearity_squared_above_the_floor(default_scores: dict) -> None:
    ls, floor = default_scores["least_squares"]["test_mse"], default_scores["noise_floor"]["test_mse"]
    assert ls - floor == pytest.approx(1.0, rel=0.1)  # nonlinearity² with g of unit variance


def test_params_file_is_valid_and_flattens_for_mlflow(defaults_file: Path) -> None:
    cfg = config.load(defaults_file)
    flat = dvc_params.stage_params(cfg, "train@mlp", DVC_FILE)
    assert flat["mlp.hidden"] == [64, 64] and flat["seed"] == cfg.seed and "linear.lr" not in flat
    assert set(dvc_params.stage_params(cfg, "generate", DVC_FILE)) >= {"seed", "data.n_samples", "data.split.train"}

