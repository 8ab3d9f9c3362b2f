"""The default params teach what the README promises (run in-process, no MLflow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import config, data, device, dvc_params, evaluation, models
from stages import distributed, paths, train
from tests.helpers import ROOT, split_files

DVC_FILE = ROOT / "dvc.yaml"


@pytest.fixture(scope="module")
def default_scores(tmp_path_factory: pytest.TempPathFactory, defaults_file: Path) -> dict:
    cfg = config.load(defaults_file)
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp_path_factory.mktemp("defaults"))
    try:
        d = cfg.data
        truth = data.generate(split_files(paths.DATA), seed=cfg.seed, n_samples=d.n_samples, n_features=d.n_features,
                              noise_std=d.noise_std, nonlinearity=d.nonlinearity, rows=d.split.sizes(d.n_samples))
        cpu = device.prepare("cpu", cfg.seed, torch.get_num_threads())
        splits = train.read_splits(truth, cpu)
        trained = {}
        for name in cfg.models:  # what stages/train.py computes, and in the same order of seeding
            device.prepare("cpu", cfg.seed, torch.get_num_threads())
            trained[name] = train.fit(cfg, name, splits, distributed.Group(cpu), progress=False)[0].model
        X_test, y_test = data.read_split(paths.split_path("test"))
        X_train, y_train = splits.X.numpy(), splits.y.numpy().ravel()
        refs = evaluation.references((X_train, y_train), (X_test, y_test), truth.noise_std, truth.w_true, truth.b_true)
        scores = refs.rows | {name: evaluation.score(refs, y_test, models.predict(m, X_test), models.linear_weights(m))
                              for name, m in trained.items()}
    finally:
        mp.undo()
    return scores


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

