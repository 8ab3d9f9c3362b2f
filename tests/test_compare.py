"""`python -m pipeline.compare` on a real SQLite store holding runs whose values we chose."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import compare, tracking
from tests.helpers import ROOT, answers, background, free_port, run_env, warm_log

EXPERIMENT = "compare-test"
DATA = "d" * 32
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _train_run(name: str, model: str, params: dict[str, Any], metrics: dict[str, float], digest: str, data: str = DATA) -> str:
    """A finished train run as the train stage leaves it (after evaluate copied its test metrics)."""
    tags = {"model": model, "model.digest": digest, "data.digest": data, "device": "cpu",
            "git.commit": COMMIT, "pipeline": f"repro@{COMMIT[:7]}"}  # as a `dvc repro` of a clean checkout
    with tracking.stage_run(f"train@{model}", EXPERIMENT, tags, name) as run:
        run.log_params({"seed": 42, "device": "auto", **{f"{model}.{k}": v for k, v in params.items()}})
        run.log_metrics(metrics)
    return run.run_id


def _scores(val: float, test: float | None) -> dict[str, float]:
    out = {"best_val_loss": val, "train_seconds": 1.25, "n_parameters": 11}
    if test is not None:
        out |= {"test_mse": test, "ratio_to_least_squares": test / 0.8, "ratio_to_noise_floor": test / 0.5}
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A workspace whose store holds: a generate run, 6 train runs (one a duplicate model, one
    not yet evaluated), and a failed train run. Yields {label: run id}."""
    root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("DVC_ROOT", str(root))
        ids: dict[str, str] = {}
        with tracking.stage_run("generate", EXPERIMENT, {"data.digest": DATA}, "generate"):
            pass
        ids["gd"] = _train_run("train@linear_gd", "linear_gd", {"steps": 30, "lr": 0.1}, _scores(1.2, 1.1), "g1")
        ids["linear"] = _train_run("train@linear", "linear", {"lr": 0.02, "epochs": 2}, _scores(1.0, 1.05), "l1")
        ids["mlp_good"] = _train_run("train@mlp [a]", "mlp", {"lr": 0.01, "hidden": [32]}, _scores(0.8, 0.9), "m1")
        ids["mlp_bad"] = _train_run("train@mlp [b]", "mlp", {"lr": 0.1, "hidden": [32]}, _scores(1.4, 1.5), "m2")
        ids["mlp_new"] = _train_run("train@mlp [c]", "mlp", {"lr": 0.001, "hidden": [64, 64]}, _scores(0.7, None), "m3")
        # Same weights as mlp_good, retrained later and not evaluated: must not add a row.
        ids["mlp_dup"] = _train_run("train@mlp [d]", "mlp", {"lr": 0.01, "hidden": [32]}, _scores(0.8, None), "m1")
        with pytest.raises(RuntimeError), tracking.stage_run("train@mlp", EXPERIMENT, {"model": "mlp"}, "train@mlp [failed]"):
            raise RuntimeError("diverged")
        mp.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(root))
        mp.delenv("DVC_ROOT")
        yield ids


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert compare.main(["--experiment", EXPERIMENT, *argv]) == 0
    return capsys.readouterr().out


ORDER = ["train@mlp [a]", "train@linear", "train@linear_gd", "train@mlp [b]", "train@mlp [c]"]


def test_json_rows_sorted_by_test_mse_with_differing_params(store: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    rows = json.loads(_main(capsys, "--format", "json"))
    assert [r["run"] for r in rows] == ORDER
    assert [r["run_id"] for r in rows] == [store[k] for k in ("mlp_good", "linear", "gd", "mlp_bad", "mlp_new")]
    best = rows[0]
    assert best["source"] == COMMIT[:7]
    assert best["params"] == {"mlp.hidden": "[32]", "mlp.lr": "0.01"}  # seed, device, data: the same everywhere
    assert best["test_mse"] == pytest.approx(0.9)
    assert best["val_mse"] == pytest.approx(0.8)
    assert best["vs_lstsq"] == pytest.approx(0.9 / 0.8)
    assert best["vs_floor"] == pytest.approx(0.9 / 0.5)
    assert best["device"] == "cpu" and best["train_s"] == pytest.approx(1.25) and best["run_s"] >= 0
    assert rows[1]["params"] == {}  # the single linear row has nothing that differs
    assert rows[-1]["test_mse"] is None and rows[-1]["params"] == {"mlp.hidden": "[64, 64]", "mlp.lr": "0.001"}


def test_table_aligned_with_short_run_ids(store: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    lines = _main(capsys).splitlines()
    header = lines[0].split()
    assert header == ["run", "model", "source", "mlp.hidden", "mlp.lr", "val_mse", "test_mse", "vs_lstsq", "vs_floor",
                      "device", "train_s", "run_s", "run_id"]
    assert set(lines[1]) == {"-", " "}
    body = [re.split(r"\s{2,}", line.strip()) for line in lines[2:]]
    assert [cells[0] for cells in body] == ORDER
    assert body[0][:10] == ["train@mlp [a]", "mlp", COMMIT[:7], "[32]", "0.01", "0.8", "0.9", "1.125", "1.800", "cpu"]
    assert body[0][-1] == store["mlp_good"][:8]
    assert body[-1][3:10] == ["[64, 64]", "0.001", "0.7", "-", "-", "-", "cpu"]  # not evaluated yet
    # Aligned: text columns start under their header, numbers end under theirs.
    assert lines[2].index(store["mlp_good"][:8]) == lines[0].index("run_id")
    end = lines[0].index("test_mse") + len("test_mse")
    assert [line[end - 5 : end] for line in lines[2:]] == ["  0.9", " 1.05", "  1.1", "  1.5", "    -"]


def test_csv_one_column_per_differing_param(store: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    rows = list(csv.DictReader(io.StringIO(_main(capsys, "--format", "csv"))))
    assert [r["run"] for r in rows] == ORDER
    assert [r["mlp.lr"] for r in rows] == ["0.01", "", "", "0.1", "0.001"]
    assert float(rows[0]["test_mse"]) == pytest.approx(0.9) and rows[-1]["test_mse"] == ""
    assert rows[0]["run_id"] == store["mlp_good"]
    assert rows[0]["pipeline"].startswith("repro@")


def test_markdown_table(store: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    lines = _main(capsys, "--format", "markdown").splitlines()
    assert lines[0].startswith("| run | model | source | mlp.hidden | mlp.lr | val_mse | test_mse |")
    assert lines[1].startswith("| --- | --- | --- | --- | --- | ---: | ---: |")
    assert [line.split(" | ")[0].removeprefix("| ") for line in lines[2:]] == ORDER
    assert lines[2].endswith(f"| {store['mlp_good']} |")


def test_model_filter_and_limit(store: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    rows = json.loads(_main(capsys, "--format", "json", "--model", "mlp"))
    assert [r["run"] for r in rows] == ["train@mlp [a]", "train@mlp [b]", "train@mlp [c]"]
    rows = json.loads(_main(capsys, "--format", "json", "--limit", "1"))
    assert [r["run"] for r in rows] == ["train@mlp [a]", "train@linear", "train@linear_gd"]  # the best per model
    rows = json.loads(_main(capsys, "--format", "json", "--model", "mlp", "--limit", "2"))
    # sorted first, limited after: the newest run (c, not yet scored) and b, the worst, are the ones left out
    assert [r["run"] for r in rows] == ["train@mlp [a]", "train@mlp [b]"]


def test_rows_on_different_data_show_the_digest() -> None:
    def run(run_id: str, data: str, test: float) -> dict[str, Any]:
        return {"run_id": run_id, "run_name": run_id, "start_time": 1, "end_time": 2, "params": {"seed": "1"},
                "metrics": {"test_mse": test}, "tags": {"model": "linear", "model.digest": run_id, "data.digest": data}}

    rows = compare.select([run("x", "a" * 32, 2.0), run("y", "b" * 32, 1.0)], limit=10)
    assert [r["run"] for r in rows] == ["y", "x"]
    assert compare.differing_params(rows) == ["data"]
    assert json.loads(compare.render(rows, "json"))[0]["params"] == {"data": "b" * 8}


def test_the_model_param_is_the_model_column_not_a_second_one() -> None:
    """Every training run logs `model` as a param (MLflow's compare page lines the models up by it): once here."""
    def run(model: str, test: float) -> dict[str, Any]:
        return {"run_id": model, "run_name": f"train@{model}", "start_time": 1, "end_time": 2,
                "params": {"model": model, "lr": "0.1" if model == "mlp" else "0.02"},
                "metrics": {"test_mse": test}, "tags": {"model": model, "model.digest": model}}

    rows = compare.select([run("mlp", 1.0), run("linear", 2.0)], limit=10)
    assert compare.differing_params(rows) == ["lr"]
    assert compare.render(rows, "table").splitlines()[0].split() == [
        "run", "model", "source", "lr", "val_mse", "test_mse", "vs_lstsq", "vs_floor", "device", "train_s", "run_s", "run_id"]


def _row(run_id: str, test: float, ratio: float) -> dict[str, Any]:
    return {"run_id": run_id, "run_name": "train@mlp", "start_time": 1, "end_time": 2, "params": {"seed": "1"},
            "metrics": {"test_mse": test, "ratio_to_least_squares": ratio}, "tags": {"model": "mlp", "model.digest": run_id}}


def test_digits_break_ties() -> None:
    """Values that 4 significant digits (3 decimals for ratios) would print alike get the digits that tell them apart."""
    rows = compare.select([_row("x", 0.99871234, 1.00412), _row("y", 0.99874, 1.00438), _row("z", 1.5, 1.6)], limit=10)
    lines = compare.render(rows, "table").splitlines()
    cells = [re.split(r"\s{2,}", line.strip()) for line in lines]
    test_col, ratio_col = cells[0].index("test_mse"), cells[0].index("vs_lstsq")
    assert [c[test_col] for c in cells[2:]] == ["0.99871", "0.99874", "1.5"]
    assert [c[ratio_col] for c in cells[2:]] == ["1.0041", "1.0044", "1.6000"]
    markdown = compare.render(rows, "markdown")
    assert "| 0.99871 |" in markdown and "| 0.99874 |" in markdown
    # No tie, no extra digits: the least precision stays.
    assert compare.precisions(rows[:1] + rows[2:]) == {"val_mse": "{:.4g}", "test_mse": "{:.4g}",
                                                      "vs_lstsq": "{:.3f}", "vs_floor": "{:.3f}"}


def test_runs_of_the_same_stage_are_told_apart(store: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Three `train@mlp` runs: committed params, an uncommitted edit of them, a DVC experiment.
    Each row names where it came from, and the param that differs is a column."""
    monkeypatch.setenv("DVC_ROOT", str(Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).parent))
    experiment = "compare-sources"
    runs = {  # label: (tags, mlp.lr, test MSE)
        "committed": ({"pipeline": f"repro@{COMMIT[:7]}"}, 0.01, 0.93),
        "edited": ({"pipeline": f"repro@{COMMIT[:7]}+9f8e7d6c"}, 0.02, 0.91),
        "exp": ({"pipeline": f"sural-hold@{COMMIT[:7]}", "dvc.exp_name": "sural-hold"}, 0.03, 0.92),
    }
    for label, (tags, lr, test) in runs.items():
        tags = {"model": "mlp", "model.digest": label, "data.digest": DATA, "git.commit": COMMIT, **tags}
        with tracking.stage_run("train@mlp", experiment, tags, "train@mlp") as run:
            run.log_params({"seed": 42, "mlp.lr": lr, "mlp.hidden": [32]})
            run.log_metrics(_scores(1.0, test))
    before = len(warm_log())
    proc = subprocess.run([sys.executable, "-m", "pipeline.compare", "--experiment", experiment], cwd=ROOT,
                          env=run_env(MLFLOW_TRACKING_URI=os.environ["MLFLOW_TRACKING_URI"]), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    if os.environ.get("PIPELINE_WARM") != "0":  # in a warm server's child, as a stage (MLflow loaded already)
        assert answers(warm_log()[before:], "pipeline.compare", ROOT) == ["run"], warm_log()[before:]
    cells = [re.split(r"\s{2,}", line.strip()) for line in proc.stdout.splitlines()]
    assert cells[0][:5] == ["run", "model", "source", "mlp.lr", "val_mse"]
    assert [c[:4] for c in cells[2:]] == [
        ["train@mlp", "mlp", f"{COMMIT[:7]} (uncommitted)", "0.02"],
        ["train@mlp", "mlp", "sural-hold", "0.03"],
        ["train@mlp", "mlp", COMMIT[:7], "0.01"],
    ]


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    env = run_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'none.db'}")
    proc = subprocess.run([sys.executable, "-m", "pipeline.compare", "--experiment", "x"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"compare: no MLflow store at {tmp_path / 'none.db'}; "
                                                "run `dvc repro` first, or set MLFLOW_TRACKING_URI"]
    assert not (tmp_path / "none.db").exists()
    env["PYTHONPATH"] = str(ROOT)  # run from a folder without params.yaml
    proc = subprocess.run([sys.executable, "-m", "pipeline.compare"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("compare: cannot read params.yaml")


def test_cli_unknown_experiment_names_the_ones_there(store: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline.compare", "--experiment", "nope"], cwd=ROOT,
                          env=run_env(MLFLOW_TRACKING_URI=os.environ["MLFLOW_TRACKING_URI"]), capture_output=True, text=True)
    assert proc.returncode == 1
    assert "no MLflow experiment 'nope'" in proc.stderr and EXPERIMENT in proc.stderr


@pytest.mark.slow
def test_cli_against_tracking_server(store: dict[str, str]) -> None:
    """The same rows through a real `mlflow server` on 127.0.0.1 via MLFLOW_TRACKING_URI."""
    port = free_port()
    tracking_root = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).parent
    server_env = run_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", os.environ["MLFLOW_TRACKING_URI"],
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    with background(cmd, f"{url}/health", tracking_root / "server.log", tracking_root, server_env):
        proc = subprocess.run([sys.executable, "-m", "pipeline.compare", "--experiment", EXPERIMENT, "--format", "json"],
                              cwd=ROOT, env=run_env(MLFLOW_TRACKING_URI=url), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert [r["run"] for r in json.loads(proc.stdout)] == ORDER
