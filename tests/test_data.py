"""Data generation: shapes, seed determinism, split sizes, the ground truth, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import data
from pipeline.files import md5_file
from tests.helpers import split_files

ROWS = {"train": 700, "val": 150, "test": 150}


def _generate(out: Path, seed: int = 0, nonlinearity: float = 1.0, n_features: int = 5) -> data.Truth:
    return data.generate(split_files(out), seed=seed, n_samples=1000, n_features=n_features, noise_std=0.5, nonlinearity=nonlinearity, rows=ROWS)


def test_splits_have_the_requested_shapes_and_columns(tmp_path: Path) -> None:
    truth = _generate(tmp_path)
    for split, n in ROWS.items():
        X, y = data.read_split(tmp_path / f"{split}.parquet", 5)
        assert X.shape == (n, 5) and y.shape == (n,)
        assert X.dtype == np.float32 and y.dtype == np.float32
    assert truth.rows == ROWS and len(truth.w_true) == 5


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    _generate(tmp_path / "a", seed=1)
    _generate(tmp_path / "b", seed=1)
    _generate(tmp_path / "c", seed=2)
    for split in data.SPLITS:
        name = f"{split}.parquet"
        assert md5_file(tmp_path / "a" / name) == md5_file(tmp_path / "b" / name)
        assert md5_file(tmp_path / "a" / name) != md5_file(tmp_path / "c" / name)


def test_block_boundaries_do_not_change_the_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows come from per-block generators, so memory stays flat; the first block is the same at any size."""
    monkeypatch.setattr(data, "BLOCK_ROWS", 256)
    w, b = data.true_linear(0, 5)
    X, _ = data.draw_block(0, 0, 0, 256, w, b, 0.5, 1.0)
    _generate(tmp_path)
    X_file, _ = data.read_split(tmp_path / "train.parquet", 5)
    np.testing.assert_array_equal(X_file[:256], X)


def test_g_is_centred_unit_variance_and_invisible_to_linear_models() -> None:
    X = np.random.default_rng(0).standard_normal((400_000, 3))
    gx = data.g(X)
    assert abs(gx.mean()) < 0.01 and abs(gx.var() - 1) < 0.02
    assert np.all(np.abs(X.T @ gx / len(gx)) < 0.01)


def test_linear_data_is_recovered_by_least_squares(tmp_path: Path) -> None:
    truth = _generate(tmp_path, nonlinearity=0.0)
    X, y = data.read_split(tmp_path / "train.parquet", 5)
    A = np.c_[X, np.ones(len(X))].astype(np.float64)
    coef = np.linalg.lstsq(A, y.astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(coef[:-1], truth.w_true, atol=0.1)
    assert abs(np.mean((A @ coef - y) ** 2) - 0.25) < 0.05


def test_missing_and_wrong_schema_files_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(data.DataError, match="missing"):
        data.read_split(tmp_path / "nope.parquet")
    _generate(tmp_path)
    with pytest.raises(data.DataError, match="expected columns x0..x2 and y"):
        data.read_split(tmp_path / "train.parquet", 3)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(data.DataError, match="not a readable Parquet file"):
        data.read_split(tmp_path / "bad.parquet")


def test_truth_round_trips_and_mismatched_data_is_refused(tmp_path: Path) -> None:
    truth = _generate(tmp_path)
    (tmp_path / "truth.json").write_text(__import__("json").dumps(truth.to_dict()))
    loaded = data.read_truth(tmp_path / "truth.json")
    assert loaded == truth
    X, _ = data.read_split(tmp_path / "val.parquet", 5)
    with pytest.raises(data.DataError, match="truth.json says 700 x 5"):
        data.check_consistent(loaded, "train", X, tmp_path / "val.parquet")
