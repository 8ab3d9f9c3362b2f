"""Data-parallel train@mlp: 2 gloo processes on CPU under torchrun match single-process training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file

from pipeline import config
from tests.helpers import answers, dvc, set_params, sh, tiny_params, warm_log

# Stated tolerance: DDP with per-rank slices and averaged gradients takes the same steps as one
# process, up to the order of float additions (measured ~3e-8 on these params).
WEIGHT_ATOL = 1e-5
LOSS_RTOL = 1e-5


def _store(repo: Path) -> tuple[Any, str]:
    """The project's embedded MLflow store: (client, id of the 'regression' experiment)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    return client, client.get_experiment_by_name("regression").experiment_id


def _mlp_runs(repo: Path) -> list[Any]:
    client, exp_id = _store(repo)
    return client.search_runs([exp_id], filter_string="tags.stage = 'train@mlp'")


def _logged_models(repo: Path, run_id: str) -> list[Any]:
    client, exp_id = _store(repo)
    return client.search_logged_models([exp_id], filter_string=f"source_run_id = '{run_id}'")


@pytest.mark.slow
def test_two_gloo_processes_match_one(project: Path) -> None:
    """One MLflow run records world size 2; outputs match single-process training within tolerance."""
    # 421 train rows: the last batch of 37 rows splits unevenly (18 + 19) across the two ranks
    set_params(project, {"mlp.distributed.nproc": 2, "data.n_samples": 601, "mlp.epochs": 4})
    before = len(warm_log())
    repro = dvc(project, "repro", "train@mlp")
    assert "Traceback" not in repro.stdout + repro.stderr
    # the stage and its two ranks all start warm: torchrun's variables are not start-up variables
    assert answers(warm_log()[before:], "train mlp", project) == ["run"] * 3, warm_log()[before:]

    runs = _mlp_runs(project)
    assert len(runs) == 1, "rank 0 alone logs: one run, not one per rank"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["distributed.world_size"] == "2" and run.data.tags["distributed.backend"] == "gloo"
    assert run.data.params["mlp.distributed.nproc"] == "2"
    assert "mlp" in {m.name for m in _logged_models(project, run.info.run_id)}  # named after the model
    assert "train@mlp" in yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    ddp_weights = load_file(project / "models" / "mlp.safetensors")
    ddp_metrics = json.loads((project / "metrics" / "train" / "mlp.json").read_text())
    assert len((project / "plots" / "loss" / "mlp.csv").read_text().splitlines()) == 1 + ddp_metrics["steps_run"]

    set_params(project, {"mlp.distributed.nproc": 1})
    sh(project, "python", "-m", "stages", "train", "mlp")
    single = _mlp_runs(project)
    assert [r.data.tags["distributed.world_size"] for r in single] == ["1", "2"]  # newest first
    weights = load_file(project / "models" / "mlp.safetensors")
    metrics = json.loads((project / "metrics" / "train" / "mlp.json").read_text())

    assert weights.keys() == ddp_weights.keys()
    for key in weights:
        diff = (weights[key] - ddp_weights[key]).abs().max().item()
        assert diff <= WEIGHT_ATOL, f"{key}: DDP differs from single-process by {diff:g}"
    for key in ("best_val_loss", "final_train_loss"):
        assert metrics[key] == pytest.approx(ddp_metrics[key], rel=LOSS_RTOL), key
    assert (metrics["best_step"], metrics["steps_run"]) == (ddp_metrics["best_step"], ddp_metrics["steps_run"])


@pytest.mark.parametrize(
    ("nproc", "expected"),
    [(0, "mlp.distributed.nproc: got 0; must be greater than or equal to 1"),
     (65, "mlp.distributed.nproc: got 65; must be less than or equal to 64"),
     (40, "distributed.nproc=40 is larger than batch_size=32")],
)
def test_nproc_is_validated(nproc: int, expected: str) -> None:
    """A process count that cannot work is refused with the key and the bound."""
    raw = tiny_params()
    raw["mlp"]["batch_size"] = 32
    raw["mlp"]["distributed"]["nproc"] = nproc
    with pytest.raises(config.ConfigError, match=expected):
        config.parse(raw)
