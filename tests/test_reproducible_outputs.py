"""Outputs are the same bytes on any machine that computes the same data and weights.

Float noise between CPUs (another BLAS kernel, another summation order) moves the last
bits of what evaluate computes; these tests put that noise in on purpose and check the
metrics files and PNGs do not change. Also: stage-written files get DVC's mode.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import config, data, evaluation, files, models, plots
from tests.helpers import ROOT, split_files

FLOAT64_ULP = 2.0**-52
PERTURBATIONS = 12


def _workspace(tmp: Path) -> config.Config:
    """Data at the committed default size, plus weights for the three models (least squares and an untrained MLP)."""
    cfg = config.parse(yaml.safe_load((ROOT / "params.yaml").read_text()))
    d = cfg.data
    truth = data.generate(split_files(tmp / "data"), seed=cfg.seed, n_samples=d.n_samples, n_features=d.n_features,
                          noise_std=d.noise_std, nonlinearity=d.nonlinearity, rows=d.split.sizes(d.n_samples))
    files.write_json(tmp / "data" / "truth.json", truth.to_dict())
    X, y = data.read_split(tmp / "data" / "train.parquet", d.n_features)
    w, b = evaluation.least_squares(X, y)
    (tmp / "models").mkdir()
    linear = models.linear_from_weights(torch.tensor(w, dtype=torch.float32).unsqueeze(1), torch.tensor([b], dtype=torch.float32))
    for name in ("linear_gd", "linear"):
        models.save_weights(linear, models.ModelSpec("linear", d.n_features), tmp / "models" / f"{name}.safetensors")
    torch.manual_seed(0)
    spec = models.ModelSpec("mlp", d.n_features, (16,), "relu", 0.0)
    models.save_weights(models.build(spec), spec, tmp / "models" / "mlp.safetensors")
    return cfg


def _noisy(rng: np.random.Generator, least_squares, predict):  # noqa: ANN001, ANN202 - wrappers of the real functions
    """The real functions, their results moved by one unit in the last place at random (as another CPU might)."""

    def noisy_least_squares(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
        w, b = least_squares(X, y)
        return w * (1 + FLOAT64_ULP * rng.choice([-1, 1], w.shape)), b * (1 + FLOAT64_ULP * rng.choice([-1, 1]))

    def noisy_predict(model: torch.nn.Module, X: np.ndarray) -> np.ndarray:
        pred = predict(model, X)
        towards = np.where(rng.random(pred.shape) < 0.5, -np.inf, np.inf).astype(pred.dtype)
        return np.where(rng.random(pred.shape) < 0.5, np.nextafter(pred, towards), pred)

    return noisy_least_squares, noisy_predict


def _evaluate(cfg: config.Config) -> tuple[dict[str, bytes], dict]:
    """Score as stages/evaluate.py does and write its metrics files; return (file bytes by row, unrounded metrics)."""
    truth = data.read_truth(Path("data/truth.json"))
    train, test = data.read_split(Path("data/train.parquet")), data.read_split(Path("data/test.parquet"))
    refs = evaluation.references(train, test, truth.noise_std, truth.w_true, truth.b_true)
    trained = {name: models.load_weights(Path(f"models/{name}.safetensors"))[0] for name in cfg.models}
    metrics = refs.rows | {name: evaluation.score(refs, test[1], models.predict(m, test[0]), models.linear_weights(m))
                           for name, m in trained.items()}
    out = {}
    Path("metrics/evaluation").mkdir(parents=True, exist_ok=True)
    for row, scores in metrics.items():
        path = Path("metrics/evaluation") / f"{row}.json"
        files.write_metrics(path, scores)
        out[row] = path.read_bytes()
    return out, metrics


def test_metrics_files_are_the_same_bytes_under_last_bit_noise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    reference, raw = _evaluate(cfg)
    rng = np.random.default_rng(0)
    lstsq, predict = evaluation.least_squares, models.predict
    moved = 0
    for _ in range(PERTURBATIONS):
        noisy_lstsq, noisy_predict = _noisy(rng, lstsq, predict)
        monkeypatch.setattr(evaluation, "least_squares", noisy_lstsq)
        monkeypatch.setattr(models, "predict", noisy_predict)
        again, raw_again = _evaluate(cfg)
        moved += raw_again != raw  # the noise did reach the unrounded numbers...
        assert again == reference  # ...and not the bytes written
    assert moved == PERTURBATIONS
    mlp = json.loads(reference["mlp"])
    assert mlp == files.round_sig(mlp) and mlp != raw["mlp"]


def test_round_sig_keeps_significant_digits_and_leaves_the_rest() -> None:
    payload = {"a": 1.23456789, "b": [0.000123456789, 123456.789], "n": 7, "inf": float("inf"), "s": "x"}
    assert files.round_sig(payload) == {"a": 1.2346, "b": [0.00012346, 123460.0], "n": 7, "inf": float("inf"), "s": "x"}


def test_write_metrics_rounds_every_value_to_significant_digits(tmp_path: Path) -> None:
    """Significant digits, not decimals: a float32 round-off of 2**-22 stays 2.3842e-07, not 0.0."""
    path = tmp_path / "m.json"
    files.write_metrics(path, {"grad_check_max_abs_diff": 2.0**-22, "best_val_loss": 1.234567891, "big": 98765.4321,
                               "f32": np.float32(0.1234567), "f64": np.float64(1e-12 / 3), "steps": 30,
                               "nested": {"curve": [0.333333333, 3333.33333]}})
    written = json.loads(path.read_text())
    assert written == {"grad_check_max_abs_diff": 2.3842e-07, "best_val_loss": 1.2346, "big": 98765.0,
                       "f32": 0.12346, "f64": 3.3333e-13, "steps": 30, "nested": {"curve": [0.33333, 3333.3]}}
    assert isinstance(written["steps"], int)
    assert '"grad_check_max_abs_diff": 2.3842e-07' in path.read_text()


def test_pngs_are_the_same_bytes_for_the_same_numbers(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    actual = rng.standard_normal(300)
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        plots.predicted_vs_actual(tmp_path / run / "p.png", "t", actual, actual + 0.1, 1.0)
        plots.loss_curves(tmp_path / run / "l.png", "t", "epoch", ([0, 1, 2], [3.0, 2.0, 1.5]), ([0, 1, 2], [3.1, 2.2, 1.7]))
    for name in ("p.png", "l.png"):
        png = (tmp_path / "a" / name).read_bytes()
        assert png.startswith(b"\x89PNG") and png == (tmp_path / "b" / name).read_bytes()
        assert b"matplotlib" not in png  # no version stamp: a matplotlib upgrade alone does not change dvc.lock


def test_written_files_get_the_mode_dvc_gives_its_own(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        files.write_json(tmp_path / "a.json", {})
        os.umask(0o027)
        files.write_csv(tmp_path / "b.txt", ["x"], [])
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o640


def test_a_stage_outside_the_project_environment_says_how_to_get_it() -> None:
    # -S: no site-packages, as with a system Python that lacks the project's packages.
    proc = subprocess.run([sys.executable, "-S", "-m", "stages", "train", "mlp"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "No module named" in proc.stderr and "source .venv/bin/activate" in proc.stderr and "./tasks.sh" in proc.stderr
