"""Working as a team: the pipeline logs through a real `mlflow server`, and data moves through a DVC remote."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import dvc, run_env, sh


pytestmark = pytest.mark.slow

STAGES = {"generate", "train@linear_gd", "train@linear", "train@mlp", "evaluate"}


def test_pipeline_logs_through_tracking_server(project: Path, start_server: Any) -> None:
    """Every stage's params, metrics, artifacts and models reach the server; nothing is stored locally."""
    server = start_server()
    dvc(project, "repro", env=run_env(MLFLOW_TRACKING_URI=server.url))
    assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()

    exp = server.api("experiments/get-by-name", experiment_name="regression")["experiment"]
    assert exp["artifact_location"].startswith("mlflow-artifacts:"), exp  # proxied through the server
    runs = server.api("runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 50})["runs"]
    by_name = {r["info"]["run_name"]: r for r in runs}
    assert set(by_name) == STAGES and len(runs) == len(STAGES)
    assert {r["info"]["status"] for r in runs} == {"FINISHED"}
    listed_runs = sh(project, "mlflow", "runs", "list", "--experiment-id", exp["experiment_id"],
                     env=run_env(MLFLOW_TRACKING_URI=server.url)).stdout  # the CLI docs/team.md shows
    assert {line.split()[3] for line in listed_runs.splitlines()[2:]} == STAGES, listed_runs

    mlp = by_name["train@mlp"]
    params = {p["key"]: p["value"] for p in mlp["data"]["params"]}
    assert params["mlp.hidden"] == "[8]" and params["mlp.epochs"] == "3"
    metrics = {m["key"]: m["value"] for m in mlp["data"]["metrics"]}
    assert metrics["best_val_loss"] > 0 and metrics["test_mse"] > 0  # test_mse: put there by evaluate

    run_id = mlp["info"]["run_id"]
    listed = server.api("artifacts/list", run_id=run_id, path="weights")["files"]
    assert [f["path"] for f in listed] == ["weights/mlp.safetensors"]
    weights = server.request(f"/get-artifact?{urllib.parse.urlencode({'run_id': run_id, 'path': 'weights/mlp.safetensors'})}")
    assert weights == (project / "models" / "mlp.safetensors").read_bytes()

    models = server.api("logged-models/search", {"experiment_ids": [exp["experiment_id"]]})["models"]
    sources = {m["info"]["source_run_id"] for m in models}
    assert sources == {by_name[s]["info"]["run_id"] for s in STAGES if s.startswith("train@")}
    model = next(m["info"] for m in models if m["info"]["source_run_id"] == run_id)
    assert model["status"] == "LOGGED_MODEL_READY"
    prefix = model["artifact_uri"].removeprefix("mlflow-artifacts:/")
    mlmodel = server.request(f"/api/2.0/mlflow-artifacts/artifacts/{prefix}/MLmodel").decode()
    assert "\n  python_function:\n" in mlmodel and f"run_id: {run_id}" in mlmodel  # the weights plus their code
    stored = server.folder / "artifacts" / prefix  # on the server's side: the same weights file, and the code
    assert (stored / "artifacts" / "mlp.safetensors").read_bytes() == weights
    assert (stored / "pyfunc_model.py").is_file() and (stored / "code" / "pipeline" / "models.py").is_file()


def test_basic_auth_server_needs_credentials(project: Path, start_server: Any) -> None:
    """With --auth, anonymous requests and stages are refused in one line; a created user can log."""
    admin = ("admin", "Admin-pass-for-tests-1")
    server = start_server("--auth", MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret-key",
                          MLFLOW_AUTH_ADMIN_PASSWORD=admin[1])
    with pytest.raises(urllib.error.HTTPError) as refused:
        server.api("experiments/search", max_results="1")
    assert refused.value.code == 401
    alice = ("alice", "Alice-pass-for-tests-1")
    server.request("/api/2.0/mlflow/users/create", {"username": alice[0], "password": alice[1]}, auth=admin)

    anonymous = sh(project, "python", "-m", "stages", "generate", check=False, env=run_env(MLFLOW_TRACKING_URI=server.url))
    assert anonymous.returncode == 1
    assert "HTTP 401" in anonymous.stderr and "MLFLOW_TRACKING_USERNAME" in anonymous.stderr
    assert "Traceback" not in anonymous.stderr

    sh(project, "python", "-m", "stages", "generate", env=run_env(
        MLFLOW_TRACKING_URI=server.url, MLFLOW_TRACKING_USERNAME=alice[0], MLFLOW_TRACKING_PASSWORD=alice[1]))
    server.auth = alice
    exp = server.api("experiments/get-by-name", experiment_name="regression")["experiment"]
    runs = server.api("runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert [(r["info"]["run_name"], r["info"]["user_id"]) for r in runs] == [("generate", "alice")]


def test_dvc_remote_fresh_clone_is_up_to_date(project: Path, tmp_path: Path) -> None:
    """repro, push to a folder remote; a fresh clone pulls and finds nothing to recompute."""
    remote = tmp_path / "dvc-remote"
    dvc(project, "repro")
    dvc(project, "remote", "add", "-d", "storage", str(remote))
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "pipeline outputs and remote")
    pushed = dvc(project, "push")
    assert any(remote.rglob("*")), pushed.stdout

    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(project), str(clone))
    assert not (clone / "models" / "mlp.safetensors").exists()
    dvc(clone, "pull")
    for out in ("data/train.parquet", "models/mlp.safetensors", "metrics/evaluation/mlp.json"):
        assert (clone / out).read_bytes() == (project / out).read_bytes(), out
    status = dvc(clone, "status")
    assert "Data and pipelines are up to date." in status.stdout, status.stdout
    repro = dvc(clone, "repro")
    assert "Running stage" not in repro.stdout, repro.stdout
    assert not (clone / "mlflow.db").exists()  # no stage ran, so nothing was logged
