"""Bad data is named: damaged, mismatched or missing splits, truth files and weights.

The bad-data cases call the readers in-process on files written by the real generator;
the last one runs the real `dvc repro`. Shared set-up: tests/helpers.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import data
from tests.helpers import N_TRAIN, assert_untouched, clone, dvc, output_of, outputs, run_env, runs, split_files


# ---------------------------------------------------------------- bad data


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/{train,val,test}.parquet and truth.json as the generate stage writes them (in-process, tiny)."""
    folder = tmp_path_factory.mktemp("tiny") / "data"
    truth = data.generate(
        split_files(folder), seed=0, n_samples=600, n_features=10, noise_std=1.0, nonlinearity=1.0,
        rows={"train": N_TRAIN, "val": 90, "test": 90},
    )
    (folder / "truth.json").write_text(json.dumps(truth.to_dict()))
    return folder


def _split_file(tiny_data: Path, tmp_path: Path, split: str = "train") -> Path:
    dest = tmp_path / "data" / f"{split}.parquet"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_data / f"{split}.parquet", dest)
    return dest


def _rewrite(path: Path, change: Any) -> None:
    table = pq.read_table(path)
    pq.write_table(change(table), path)


BAD_DATA: list[tuple[str, Any, str]] = [
    ("missing", lambda p: p.unlink(), "train.parquet: missing; run `dvc repro generate`"),
    ("empty-file", lambda p: p.write_bytes(b""), "train.parquet: not a readable Parquet file"),
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "train.parquet: not a readable Parquet file ("),
    ("renamed-column", lambda p: _rewrite(p, lambda t: t.rename_columns([*t.column_names[:-1], "target"])),
     "train.parquet: missing column(s) y; unexpected column(s) target; expected columns x0..x9 and y, all float32"),
    ("float64-column", lambda p: _rewrite(p, lambda t: t.set_column(0, "x0", t.column(0).cast(pa.float64()))),
     "train.parquet: x0 is double; expected columns x0..x9 and y"),
    ("extra-column", lambda p: _rewrite(p, lambda t: t.append_column("x10", t.column(0))),
     "train.parquet: unexpected column(s) x10"),
    ("dropped-feature", lambda p: _rewrite(p, lambda t: t.drop_columns(["x9"])), "train.parquet: missing column(s) x9"),
    ("reordered", lambda p: _rewrite(p, lambda t: t.select(["y", *t.column_names[:-1]])), "train.parquet: columns in the wrong order (y, x0"),
    ("nulls", lambda p: _rewrite(p, lambda t: t.set_column(3, "x3", pa.array([None] * t.num_rows, pa.float32()))),
     "train.parquet: missing values in {'x3': 420}"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("name", "damage", "expected"), BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_split_file_is_named(tiny_data: Path, tmp_path: Path, name: str, damage: Any, expected: str) -> None:
    path = _split_file(tiny_data, tmp_path)
    damage(path)
    with pytest.raises(data.DataError) as err:
        data.read_split(path, 10)
    assert expected in str(err.value) and str(path) in str(err.value)


def _truth(tiny_data: Path) -> dict[str, Any]:
    return json.loads((tiny_data / "truth.json").read_text())


BAD_TRUTH: list[tuple[str, Any, str]] = [
    ("not-json", "{\"w_true\": [1.0,", "truth.json: not valid JSON"),
    ("not-an-object", [1, 2], "truth.json: not a valid truth file: expected a JSON object, got list"),
    ("lacks-key", lambda t: {k: v for k, v in t.items() if k != "rows"}, "truth.json: not a valid truth file: lacks ['rows']"),
    ("short-w_true", lambda t: t | {"w_true": t["w_true"][:3]}, "truth.json: not a valid truth file: w_true has 3 entries but n_features is 10"),
    ("bad-rows", lambda t: t | {"rows": {"train": 420}}, "truth.json: not a valid truth file: rows is {'train': 420}"),
    ("bad-n_features", lambda t: t | {"n_features": "ten"}, "truth.json: not a valid truth file: n_features is 'ten'"),
    ("no-digests", lambda t: {k: v for k, v in t.items() if k != "digests"}, "truth.json: not a valid truth file: lacks ['digests']"),
    ("bad-digest", lambda t: t | {"digests": t["digests"] | {"val": "not-an-md5"}}, "truth.json: not a valid truth file: digests is"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("name", "edit", "expected"), BAD_TRUTH, ids=[c[0] for c in BAD_TRUTH])
def test_bad_truth_file_is_named(tiny_data: Path, tmp_path: Path, name: str, edit: Any, expected: str) -> None:
    path = tmp_path / "truth.json"
    if isinstance(edit, str):
        path.write_text(edit)
    else:
        path.write_text(json.dumps(edit(_truth(tiny_data)) if callable(edit) else edit))
    with pytest.raises(data.DataError) as err:
        data.read_truth(path)
    assert expected in str(err.value) and str(path) in str(err.value)
    assert "rerun `dvc repro generate`" in str(err.value) or "not a valid truth file: expected" in str(err.value)


@pytest.mark.bad_input
@pytest.mark.parametrize("change", ["rows", "n_features"])
def test_truth_that_does_not_match_the_data(tiny_data: Path, tmp_path: Path, change: str) -> None:
    raw = _truth(tiny_data)
    if change == "rows":
        raw["rows"]["train"] += 1
        expected = f"has {N_TRAIN} rows x 10 features, but truth.json says {N_TRAIN + 1} x 10"
    else:
        raw = raw | {"n_features": 11, "w_true": raw["w_true"] + [0.0]}
        expected = "missing column(s) x10"
    truth = data.Truth.from_dict(raw)
    path = _split_file(tiny_data, tmp_path)
    with pytest.raises(data.DataError) as err:
        X, _ = data.read_split(path, truth.n_features)
        data.check_consistent(truth, "train", X, path)
    assert expected in str(err.value) and str(path) in str(err.value)


@pytest.mark.bad_input
@pytest.mark.parametrize("damage", ["truncated", "not-safetensors"])
def test_damaged_weights_are_named(tmp_path: Path, damage: str) -> None:
    import numpy as np

    from pipeline import models

    path = tmp_path / "mlp.safetensors"
    spec = models.ModelSpec("mlp", 10, (8,), "relu", 0.0)
    models.save_weights(models.build(spec), spec, path)
    raw = path.read_bytes()
    assert models.predict(models.load_weights(path)[0], np.zeros((2, 10), np.float32)).shape == (2,)  # intact, it loads
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"PK\x03\x04 a zip, say")
    with pytest.raises(models.WeightsError, match="not a weights file this pipeline wrote") as err:
        models.load_weights(path)
    assert str(path) in str(err.value)


@pytest.mark.slow
@pytest.mark.bad_input
def test_damaged_data_stops_the_stage_and_repro_repairs_it(baseline: Path, tmp_path: Path) -> None:
    """Through DVC: the train stage names the file and writes nothing; the data is checked against truth.json's
    digests before the stage opens its run, so no run is started; `dvc repro` restores the data."""
    repo = clone(baseline, tmp_path / "repo")
    before, lock = outputs(repo), (repo / "dvc.lock").read_bytes()
    train = repo / "data" / "train.parquet"
    train.write_bytes(train.read_bytes()[:500])
    proc = dvc(repo, "repro", "--single-item", "train@linear", check=False)
    text = output_of(proc)
    assert proc.returncode != 0
    assert "train@linear: data/train.parquet: not the file generate wrote (md5 " in text and "Traceback" not in text
    assert_untouched(repo, before, lock, changed=("data/train.parquet",))
    assert runs(repo) == []
    dvc(repo, "repro")
    assert outputs(repo) == before


# ---------------------------------------------------------------- data that reads fine but is not what generate wrote


def _flip_a_byte(path: Path) -> None:
    """One bit of one value changed in the middle of the file: still a readable Parquet file of the right shape."""
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _rewrite_a_value(path: Path) -> None:
    """One y value rewritten with pandas, as a user fixing a row by hand would."""
    import pandas as pd

    frame = pd.read_parquet(path)
    frame.loc[3, "y"] = 0.0
    frame.to_parquet(path, index=False)


TAMPER = {"flipped-byte": _flip_a_byte, "value-rewritten-with-pandas": _rewrite_a_value}


@pytest.mark.bad_input
@pytest.mark.parametrize("tamper", TAMPER, ids=list(TAMPER))
def test_split_that_is_not_what_generate_wrote_is_refused(tiny_data: Path, tmp_path: Path, tamper: str) -> None:
    files = {split: _split_file(tiny_data, tmp_path, split) for split in data.SPLITS}
    truth = data.read_truth(tiny_data / "truth.json")
    data.verify_digests(truth, files)  # as generate wrote them: accepted
    TAMPER[tamper](files["val"])
    X, _ = data.read_checked_split(files["val"], truth, "val")  # readable, right shape: only the digest tells
    assert X.shape == (90, 10)
    with pytest.raises(data.DataError) as err:
        data.verify_digests(truth, files)
    message = str(err.value)
    assert message.startswith(f"{files['val']}: not the file generate wrote (md5 ") and "\n" not in message
    assert f"truth.json records {truth.digests['val']}" in message and "dvc checkout --force" in message


@pytest.mark.slow
@pytest.mark.bad_input
def test_tampered_split_stops_every_stage_before_any_work(baseline: Path, tmp_path: Path) -> None:
    """The issue's case 5: a flipped byte, or a value rewritten with pandas, is refused in one line naming the file,
    by a stage run by hand and under `dvc repro -s ... -f`; no MLflow run, no new output; the advice restores it."""
    repo = clone(baseline, tmp_path / "repo")
    before, lock = outputs(repo), (repo / "dvc.lock").read_bytes()
    _flip_a_byte(repo / "data" / "train.parquet")
    _rewrite_a_value(repo / "data" / "test.parquet")
    tampered = ("data/train.parquet", "data/test.parquet")

    cases = [  # (command, the stage's one line): train reads train first, evaluate checks train, val, test in order
        ([sys.executable, "-m", "stages", "train", "mlp"], "train@mlp: data/train.parquet: not the file generate wrote"),
        ([sys.executable, "-m", "dvc", "repro", "-s", "train@mlp", "-f"], "train@mlp: data/train.parquet: not the file generate wrote"),
        ([sys.executable, "-m", "stages", "evaluate"], "evaluate: data/train.parquet: not the file generate wrote"),
    ]
    for cmd, expected in cases:
        proc = subprocess.run(cmd, cwd=repo, env=run_env(), capture_output=True, text=True, timeout=600)
        text = output_of(proc)
        assert proc.returncode != 0, (cmd, text)
        lines = [line for line in text.splitlines() if "not the file generate wrote" in line]
        assert len(lines) == 1 and lines[0].startswith(expected), (cmd, text)
        assert "Traceback" not in text
        assert_untouched(repo, before, lock, changed=tampered)
        assert runs(repo) == [] and not (repo / "mlflow.db").exists(), cmd  # no run: refused before the store is opened

    shutil.copy(baseline / "data" / "train.parquet", repo / "data" / "train.parquet")  # train fixed: test still named
    proc = subprocess.run([sys.executable, "-m", "stages", "evaluate"], cwd=repo, env=run_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1 and proc.stderr.startswith("evaluate: data/test.parquet: not the file generate wrote")

    dvc(repo, "checkout", "--force", "data/test.parquet")  # the line's advice
    dvc(repo, "checkout")  # `dvc repro -s -f` removed train@mlp's outputs before running it; the cache has them
    assert outputs(repo) == before
    assert "up to date" in dvc(repo, "status").stdout
