"""The real thing: `dvc repro` in a throwaway git repo, a real MLflow SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import Reproduced, dvc

pytestmark = pytest.mark.slow

STAGES = ["generate", "train@linear_gd", "train@linear", "train@mlp", "evaluate"]


def _ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


@pytest.fixture(scope="module")
def repro(reproduced: Reproduced) -> tuple[Path, str]:
    """One cold `dvc repro` shared by the tests below (they only read, except the last, which leaves it up to date)."""
    return reproduced.repo, reproduced.output


def _client(repo: Path):  # noqa: ANN202 - MlflowClient, imported lazily
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def test_every_stage_ran_and_wrote_its_outputs(repro: tuple[Path, str]) -> None:
    repo, out = repro
    assert _ran(out) == STAGES
    assert "%|" not in out  # progress bars stay quiet when output is not a terminal
    for rel in ["data/train.parquet", "data/val.parquet", "data/test.parquet", "data/truth.json",
                "models/linear_gd.safetensors", "models/linear.safetensors", "models/mlp.safetensors",
                "plots/loss/mlp.csv", "plots/predictions/mlp.csv", "metrics/evaluation/mlp.json", "metrics/train/mlp.json"]:
        assert (repo / rel).is_file(), rel
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)


def test_metrics_hold_every_model_and_both_references(repro: tuple[Path, str]) -> None:
    repo, _ = repro
    rows = {p.stem: json.loads(p.read_text()) for p in (repo / "metrics/evaluation").glob("*.json")}
    assert sorted(rows) == ["least_squares", "linear", "linear_gd", "mlp", "noise_floor"]
    for name in ["linear_gd", "linear", "mlp"]:
        assert {"test_mse", "test_rmse", "test_mae", "test_r2", "ratio_to_least_squares", "ratio_to_noise_floor"} <= set(rows[name])
    assert "weight_distance" in rows["linear_gd"] and "weight_distance" not in rows["mlp"]
    assert rows["noise_floor"]["test_mse"] == pytest.approx(1.0)
    assert rows["least_squares"]["ratio_to_least_squares"] == pytest.approx(1.0)
    shown = dvc(repo, "metrics", "show", "--json").stdout
    assert "mlp" in shown and "ratio_to_noise_floor" in shown


def test_mlflow_holds_one_finished_run_per_stage(repro: tuple[Path, str]) -> None:
    repo, _ = repro
    client = _client(repo)
    exp = client.get_experiment_by_name("regression")
    runs = {r.data.tags["stage"]: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == sorted(STAGES)
    for stage, run in runs.items():
        assert run.info.status == "FINISHED", stage
        assert run.data.params and run.data.metrics, stage
        assert run.data.tags["git.commit"] != "unknown" and run.data.tags["device"] == "cpu"
        assert run.info.run_name == stage
        assert run.data.tags["data.digest"] == runs["generate"].data.tags["data.digest"]
    mlp = runs["train@mlp"]
    assert mlp.data.params["mlp.hidden"] == "[8]" and "linear.lr" not in mlp.data.params
    assert mlp.data.metrics["test_mse"] > 0  # evaluate put the test score beside the training run
    assert runs["evaluate"].data.tags["scored.mlp.run_id"] == mlp.info.run_id
    curve = client.get_metric_history(runs["train@linear_gd"].info.run_id, "train_loss")
    assert len(curve) == 30 and curve[-1].value < curve[0].value
    digests = {d.dataset.name: d.dataset.digest for d in runs["generate"].inputs.dataset_inputs}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    lock_md5 = {Path(o["path"]).stem: o["md5"] for o in lock["stages"]["generate"]["outs"]}
    assert digests == {k: lock_md5[k] for k in ("train", "val", "test")}
    weights = client.list_artifacts(runs["train@mlp"].info.run_id, "weights")
    assert [a.path for a in weights] == ["weights/mlp.safetensors"]
    assert [a.path for a in client.list_artifacts(runs["generate"].info.run_id, "weights")] == ["weights/true_weights.json"]


def test_logged_model_loads_and_predicts(repro: tuple[Path, str]) -> None:
    import mlflow

    repo, _ = repro
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    exp = mlflow.get_experiment_by_name("regression")
    logged = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
    assert len(logged) == 3
    for model_info in logged:
        model = mlflow.pytorch.load_model(model_info.model_uri)
        import torch

        X = torch.randn(7, 10)
        assert model(X).shape == (7, 1)
        pyfunc = mlflow.pyfunc.load_model(model_info.model_uri)
        assert pyfunc.metadata.signature is not None
        assert np.asarray(pyfunc.predict(X.numpy())).shape == (7, 1)


def test_rerun_is_a_no_op_and_a_changed_mlp_param_reruns_only_mlp_and_evaluate(repro: tuple[Path, str]) -> None:
    from tests.conftest import set_params

    repo, _ = repro
    assert _ran(dvc(repo, "repro").stdout) == []
    set_params(repo, {"mlp.lr": 0.01})
    assert _ran(dvc(repo, "repro").stdout) == ["train@mlp", "evaluate"]
    assert dvc(repo, "plots", "show", "-o", "dvc_plots").returncode == 0
    assert (repo / "dvc_plots" / "index.html").stat().st_size > 0
