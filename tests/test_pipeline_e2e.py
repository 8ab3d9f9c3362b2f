"""The real thing: `dvc repro` in a throwaway git repo, a real MLflow SQLite store."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import (
    Reproduced, check_logged_models, copy_with_store, dvc, model_names, pipeline_stages, quiet, set_params, sh,
)


pytestmark = pytest.mark.slow

STAGES = [*pipeline_stages(), "params"]


def _ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


@pytest.fixture(scope="module")
def repro(reproduced: Reproduced) -> tuple[Path, str]:
    """One cold `dvc repro` shared by the tests below (they read it, or copy it before changing anything)."""
    return reproduced.repo, reproduced.output


def _client(repo: Path):  # noqa: ANN202 - MlflowClient, imported lazily
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def test_every_stage_ran_and_wrote_its_outputs(repro: tuple[Path, str]) -> None:
    repo, out = repro
    assert _ran(out) == STAGES
    assert "%|" not in out  # progress bars stay quiet when output is not a terminal
    each = [f"{folder}/{m}{ext}" for m in model_names() for folder, ext in (
        ("models", ".safetensors"), ("plots/loss", ".csv"), ("plots/predictions", ".csv"), ("metrics/evaluation", ".json"),
        ("metrics/train", ".json"))]
    for rel in ["data/train.parquet", "data/val.parquet", "data/test.parquet", "data/truth.json", *each]:
        assert (repo / rel).is_file(), rel
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    for rel in [f"plots/loss/{model_names()[0]}.png", f"plots/predictions/{model_names()[-1]}.png", "metrics/evaluation/noise_floor.json"]:
        assert (repo / rel).read_bytes()[:4] in (b"\x89PNG", b"{\n  ")
        assert (repo / rel).stat().st_mode & 0o777 == 0o644, rel  # as DVC's own files (umask 022)


def test_metrics_hold_every_model_and_both_references(repro: tuple[Path, str]) -> None:
    repo, _ = repro
    rows = {p.stem: json.loads(p.read_text()) for p in (repo / "metrics/evaluation").glob("*.json")}
    assert sorted(rows) == sorted(["least_squares", "noise_floor", *model_names()])
    for name in model_names():
        assert {"test_mse", "test_rmse", "test_mae", "test_r2", "ratio_to_least_squares", "ratio_to_noise_floor"} <= set(rows[name])
    assert "weight_distance" in rows["linear_gd"] and "weight_distance" not in rows["mlp"]
    assert rows["noise_floor"]["test_mse"] == pytest.approx(1.0)
    assert rows["least_squares"]["ratio_to_least_squares"] == pytest.approx(1.0)
    shown = dvc(repo, "metrics", "show", "--json").stdout
    assert all(f"{m}.json" in shown for m in model_names()) and "ratio_to_noise_floor" in shown


def test_mlflow_holds_one_finished_run_per_stage(repro: tuple[Path, str]) -> None:
    repo, _ = repro
    client = _client(repo)
    exp = client.get_experiment_by_name("regression")
    runs = {r.data.tags["stage"]: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == sorted(s for s in STAGES if s != "params")  # the params check opens no run
    for stage, run in runs.items():
        assert run.info.status == "FINISHED", stage
        assert run.data.params and run.data.metrics, stage
        assert run.data.tags["git.commit"] != "unknown" and run.data.tags["device"] == "cpu"
        assert run.info.run_name == stage
        assert run.data.tags["data.digest"] == runs["generate"].data.tags["data.digest"]
    mlp = runs["train@mlp"]
    assert mlp.data.params["mlp.hidden"] == "[8]" and "linear.lr" not in mlp.data.params
    assert mlp.data.tags["training.loop"] == "eager (device is cpu)"  # and on CUDA, "cuda_graph" or why not
    assert mlp.data.metrics["test_mse"] > 0  # evaluate put the test score beside the training run
    assert runs["evaluate"].data.tags["scored.mlp.run_id"] == mlp.info.run_id
    curve = client.get_metric_history(runs["train@linear_gd"].info.run_id, "train_loss")
    assert len(curve) == 30 and curve[-1].value < curve[0].value
    digests = {d.dataset.name: d.dataset.digest for d in runs["generate"].inputs.dataset_inputs}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    lock_md5 = {Path(o["path"]).stem: o["md5"] for o in lock["stages"]["generate"]["outs"]}
    assert digests == {k: lock_md5[k] for k in ("train", "val", "test")}
    for name in model_names():
        pngs = [a.path for folder in ("plots/loss", "plots/predictions")
                for a in client.list_artifacts(runs[f"train@{name}"].info.run_id, folder)]
        assert pngs == [f"plots/loss/{name}.png", f"plots/predictions/{name}.png"]
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    for name in model_names():  # a sweep view per model: its runs, its own params
        view = json.loads(exp.tags[f"mlflow.sharedViewState.{name}-sweep"])
        assert view["searchFilter"] == f"tags.stage = 'train@{name}'"
        assert {c for c in view["selectedColumns"] if c.startswith("params.")} == {
            f"params.`{p}`" for p in runs[f"train@{name}"].data.params if p.startswith(f"{name}.")}
    assert {r.data.tags["started_by"] for r in runs.values()} == {"dvc"}
    weights = client.list_artifacts(runs["train@mlp"].info.run_id, "weights")
    assert [a.path for a in weights] == ["weights/mlp.safetensors"]
    assert [a.path for a in client.list_artifacts(runs["generate"].info.run_id, "weights")] == ["weights/true_weights.json"]


def test_the_training_runs_share_the_neutral_params_and_metrics(repro: tuple[Path, str]) -> None:
    """MLflow's compare page lines the models up: every training run has each neutral param and metric,
    and the saved `models` view shows them, best test MSE first."""
    from pipeline.zoo import NEUTRAL_PARAMS
    from stages.train import MODELS_METRICS

    repo, _ = repro
    client = _client(repo)
    exp = client.get_experiment_by_name("regression")
    runs = {r.data.tags["stage"]: r for r in client.search_runs([exp.experiment_id], "tags.stage LIKE 'train@%'")}
    assert sorted(runs) == sorted(f"train@{m}" for m in model_names())
    for stage, run in runs.items():
        assert set(NEUTRAL_PARAMS) <= set(run.data.params), (stage, sorted(run.data.params))
        assert set(MODELS_METRICS) <= set(run.data.metrics), (stage, sorted(run.data.metrics))
        assert run.data.params["model"] == stage.removeprefix("train@")
        assert run.data.params["parameters"] == run.data.tags["n_parameters"]
    gd = runs["train@linear_gd"].data.params
    assert (gd["optimizer"], gd["batch_size"], gd["epochs"]) == ("gd (full batch)", "420", "30")  # TINY: 420 train rows
    assert runs["train@mlp"].data.params["lr"] == runs["train@mlp"].data.params["mlp.lr"]
    view = json.loads(exp.tags["mlflow.sharedViewState.models"])
    assert view["searchFilter"] == "tags.stage LIKE 'train@%'"
    assert (view["orderByKey"], view["orderByAsc"]) == ("metrics.`test_mse`", True)
    assert {f"params.`{p}`" for p in NEUTRAL_PARAMS} | {f"metrics.`{m}`" for m in MODELS_METRICS} <= set(view["selectedColumns"])
    shown = client.search_runs([exp.experiment_id], view["searchFilter"])  # the filter as the UI sends it
    assert sorted(r.info.run_id for r in shown) == sorted(r.info.run_id for r in runs.values())


def test_train_metrics_files_hold_mlflow_values_to_5_significant_digits(repro: tuple[Path, str]) -> None:
    """Every training metric in metrics/train/ is MLflow's value to 5 significant digits: no decimal
    rounding (the gradient check, a float32 round-off near 1e-7, used to be written as 0.0)."""
    repo, _ = repro
    client = _client(repo)
    exp = client.get_experiment_by_name("regression")
    for name in model_names():
        run = client.search_runs([exp.experiment_id], f"tags.stage = 'train@{name}'")[0]
        written = json.loads((repo / "metrics" / "train" / f"{name}.json").read_text())
        assert set(written) <= set(run.data.metrics), name
        for key, value in written.items():
            assert value == float(f"{run.data.metrics[key]:.5g}"), (name, key, value, run.data.metrics[key])
    gd = json.loads((repo / "metrics" / "train" / "linear_gd.json").read_text())
    assert "grad_check_max_abs_diff" in gd


def test_a_cold_repro_prints_no_warning_and_no_traceback(reproduced: Reproduced) -> None:
    assert quiet(reproduced.stderr), reproduced.stderr


def test_logged_models_load_and_serve_the_stage_predictions(repro: tuple[Path, str], tmp_path: Path) -> None:
    repo, _ = repro
    check_logged_models(repo, tmp_path)


def test_rerun_is_a_no_op_and_a_changed_mlp_param_reruns_only_mlp_and_evaluate(repro: tuple[Path, str], tmp_path: Path) -> None:

    repo = copy_with_store(repro[0], tmp_path / "repo")  # the shared project stays as the cold repro left it
    assert _ran(dvc(repo, "repro").stdout) == []
    set_params(repo, {"mlp.lr": 0.01})
    assert _ran(dvc(repo, "repro").stdout) == ["train@mlp", "evaluate", "params"]  # and the check of the edited file
    assert dvc(repo, "plots", "show", "-o", "dvc_plots").returncode == 0
    page = (repo / "dvc_plots" / "index.html").read_text()
    for png in (f"{kind}_{m}" for kind in ("loss", "predictions") for m in model_names()):  # images: no CDN needed
        assert f'<img src="static/workspace_plots_{png}.png">' in page


def test_a_stage_run_by_hand_is_tagged_and_says_where_its_run_went(repro: tuple[Path, str], tmp_path: Path) -> None:

    repo = copy_with_store(repro[0], tmp_path / "repo")  # its run and logged model go to the copy's store
    proc = sh(repo, sys.executable, "-m", "stages", "train", model_names()[0])  # no DVC: its environment has no DVC_ROOT
    run_id = proc.stderr.split("MLflow run ")[1].split()[0]
    assert f"experiment 'regression' at sqlite:///{repo}/mlflow.db" in proc.stderr
    tags = _client(repo).get_run(run_id).data.tags
    assert tags["started_by"] == "hand" and tags["pipeline"].startswith("hand@")
