"""When MLflow fails: a server killed mid-training, a killed stage, a broken store, interruptions.

Real parts throughout: `dvc repro` in a throwaway git+DVC copy, a real `mlflow server`
killed by process group, the real SQLite store damaged, locked or made read-only.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, copy_project, dvc, run_env, set_params, sh
from pipeline import tracking
from stages import common
from test_robustness import spawn, statuses, wait_for_running  # noqa: F401  (spawn is a fixture)
from test_team import _free_port, _group_alive, _stop_group

TRAIN_OUTS = ("models/mlp.safetensors", "plots/loss/mlp.csv", "metrics/train/mlp.json")


def _server(folder: Path, port: int) -> subprocess.Popen[bytes]:
    """scripts/mlflow-server.sh on `port` with its store in `folder`, in its own process group, once healthy."""
    proc = subprocess.Popen(
        [str(ROOT / "scripts" / "mlflow-server.sh")],
        env=run_env(SERVER_DIR=str(folder), PORT=str(port), WORKERS="1", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    for _ in range(1200):
        assert proc.poll() is None, f"mlflow server exited {proc.returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.1)
    raise AssertionError("mlflow server never answered /health")


def _server_runs(uri: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.slow
def test_server_killed_mid_training_keeps_the_work_and_sync_finishes_the_run(tmp_path: Path, spawn: Any) -> None:
    repo = copy_project(tmp_path / "repo", {"data.n_samples": 20000, "mlp.epochs": 60, "mlp.patience": 100})
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    env = run_env(MLFLOW_TRACKING_URI=uri)
    server = _server(tmp_path / "server", port)
    try:
        dvc(repo, "repro", "generate", env=env)
        job = spawn([sys.executable, "-m", "dvc", "repro", "train@mlp"], repo, env)
        deadline = time.monotonic() + 300
        while not any(r.info.status == "RUNNING" for r in _server_runs(uri)):
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.5)
        os.killpg(server.pid, signal.SIGKILL)  # the whole server, workers included, mid-training
        server.wait()
        out, err = job.communicate(timeout=600)
    finally:
        _stop_group(server)
    text = out + err
    assert job.returncode == 0, text
    assert "Traceback" not in text
    (line,) = [ln for ln in text.splitlines() if "train@mlp: the MLflow store failed during the run" in ln]
    assert "Connection refused" in line and "./tasks.sh sync" in line and ".mlflow-spool/" in line
    assert all((repo / p).exists() for p in TRAIN_OUTS)
    assert "up to date" in dvc(repo, "status", "train@mlp").stdout  # DVC committed the outputs
    (spooled,) = (repo / tracking.SPOOL_DIR).iterdir()
    run_id = json.loads((spooled / "meta.json").read_text())["run_id"]
    assert run_id  # the run was created on the server before it died

    server = _server(tmp_path / "server", port)  # the same store comes back
    try:
        assert {r.info.run_id: r.info.status for r in _server_runs(uri)}[run_id] == "RUNNING"
        mtime = (repo / TRAIN_OUTS[0]).stat().st_mtime
        assert "Stage 'train@mlp' didn't change" in dvc(repo, "repro", "train@mlp", env=env).stdout  # no retraining
        synced = sh(repo, sys.executable, "-m", "pipeline.sync", env=env)
        assert f"train@mlp: run {run_id} synced as FINISHED" in synced.stdout and "1 model" in synced.stdout
        assert not any((repo / tracking.SPOOL_DIR).iterdir())
        (run,) = [r for r in _server_runs(uri) if r.info.run_id == run_id]
        assert run.info.status == "FINISHED" and run.info.end_time > run.info.start_time
        metrics = json.loads((repo / "metrics/train/mlp.json").read_text())
        assert run.data.metrics["best_val_loss"] == pytest.approx(metrics["best_val_loss"])
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        assert len(client.get_metric_history(run_id, "val_loss")) == metrics["steps_run"]
        assert {a.path for a in client.list_artifacts(run_id)} >= {"weights"}
        (model,) = client.search_logged_models([run.info.experiment_id])
        assert model.source_run_id == run_id
        import mlflow.pytorch
        import numpy as np

        mlflow.set_tracking_uri(uri)
        loaded = mlflow.pytorch.load_model(f"models:/{model.model_id}")
        assert loaded(__import__("torch").zeros(2, 10)).shape == (2, 1)
        assert (repo / TRAIN_OUTS[0]).stat().st_mtime == mtime and np.isfinite(metrics["best_val_loss"])
    finally:
        _stop_group(server)
    assert not _group_alive(server.pid)
