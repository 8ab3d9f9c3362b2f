"""The team configuration for real: a throwaway PostgreSQL cluster behind `scripts/mlflow-server.sh`,
the pipeline and a queued sweep (`dvc queue start -j 2`) logging through it, checked over REST.

PostgreSQL refuses to run as root, so as root (CI) the cluster runs as the `postgres` user via
`runuser`; its data folder is a fresh temp folder owned by that user, removed at the end.
The commands are the ones docs/team.md shows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from pipeline.files import round_sig
from tests.helpers import dvc, experiments, pipeline_stages, run_env, run_queue, sh

pytestmark = pytest.mark.slow

SWEEP = "mlp.lr=0.001,0.01,0.1"  # three queued experiments


def _runs(server: Any, experiment_id: str) -> list[dict[str, Any]]:
    found = server.api("runs/search", {"experiment_ids": [experiment_id], "max_results": 1000})
    return found.get("runs", [])


def _by_key(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {i["key"]: i["value"] for i in items}


def test_pipeline_and_queued_sweep_through_postgres_server(postgres: str, start_server: Any, project: Path) -> None:
    server = start_server(BACKEND_STORE_URI=postgres)
    env = run_env(MLFLOW_TRACKING_URI=server.url)
    dvc(project, "repro", env=env)
    dvc(project, "exp", "run", "--queue", "-S", SWEEP, env=env)
    status = run_queue(project, env=env)
    assert "Failed" not in status, status
    exps = experiments(project)
    assert len(exps) == 3, exps.keys()

    # Every run arrived, finished, with its tags, params and metrics.
    exp = server.api("experiments/get-by-name", experiment_name="regression")["experiment"]
    runs = _runs(server, exp["experiment_id"])
    assert {r["info"]["status"] for r in runs} == {"FINISHED"}
    names = sorted(r["info"]["run_name"] for r in runs)
    expected = pipeline_stages()
    for name in exps:  # the sweep changes mlp.lr only: the rest is restored from DVC's run cache
        expected += [f"evaluate [{name}]", f"train@mlp [{name}]"]
    assert names == sorted(expected)
    train_ids = set()
    for run in runs:
        tags, params, metrics = (_by_key(run["data"].get(k, [])) for k in ("tags", "params", "metrics"))
        stage = tags["stage"]
        assert {"git.commit", "pipeline", "data.digest"} <= set(tags), (stage, tags)
        assert params, stage
        if stage.startswith("train@"):
            train_ids.add(run["info"]["run_id"])
            assert metrics["best_val_loss"] > 0 and metrics["test_mse"] > 0, (stage, metrics)
            assert "model.digest" in tags
        if stage == "evaluate":
            assert metrics["mlp.test_mse"] > 0
            name = tags.get("dvc.exp_name")
            if name:  # the server holds exactly the score DVC recorded for that experiment
                assert round_sig(metrics["mlp.test_mse"]) == exps[name]["metrics"]["metrics/evaluation/mlp.json"]["test_mse"]
                assert tags["registry.mlp"].startswith("regression-mlp v"), tags

    # Every training run has its logged model on the server.
    models = server.api("logged-models/search", {"experiment_ids": [exp["experiment_id"]]})["models"]
    assert {m["info"]["source_run_id"] for m in models} == train_ids
    assert {m["info"]["status"] for m in models} == {"LOGGED_MODEL_READY"}

    # The registry: one version per mlp training run; @champion is the lowest validation MSE.
    versions = server.api("model-versions/search", filter="name = 'regression-mlp'")["model_versions"]
    assert len(versions) == 4 and {v["run_id"] for v in versions} <= train_ids
    scores = {v["version"]: float(_by_key(v["tags"])["val_mse"]) for v in versions}
    champion = server.api("registered-models/alias", name="regression-mlp", alias="champion")["model_version"]
    assert scores[champion["version"]] == min(scores.values()), (champion["version"], scores)
    linear = server.api("model-versions/search", filter="name = 'regression-linear'")["model_versions"]
    assert len(linear) == 1  # the sweep did not retrain it, so it was not registered again

    # `python -m pipeline.compare` reads the same runs back from the server.
    compared = json.loads(sh(project, sys.executable, "-m", "pipeline.compare", "--format", "json", "--model", "mlp",
                             env=env).stdout)
    run_scores = {r["info"]["run_id"]: _by_key(r["data"]["metrics"])["test_mse"] for r in runs
                  if _by_key(r["data"]["tags"])["stage"] == "train@mlp"}
    assert sorted(row["test_mse"] for row in compared) == pytest.approx(sorted(run_scores.values()))

    # It all lives in PostgreSQL, and nothing went to a local store.
    import psycopg

    with psycopg.connect(postgres) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone() == (len(runs),)
    assert not list(project.rglob("mlflow.db")) and not (project / "mlartifacts").exists()
