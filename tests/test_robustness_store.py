"""The MLflow store: a server that is down, many stages creating the store at once, no secret logged.

Set-up shared by tests/test_robustness_*.py: tests/helpers.py, and the `baseline` fixture in tests/conftest.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    REMOTE_TOKEN, SECRETS, assert_untouched, clone, dvc, free_port, output_of, outputs, run_env, runs, set_params,
)


# ---------------------------------------------------------------- a tracking server that is down


@pytest.mark.slow
@pytest.mark.bad_input
def test_tracking_server_down_fails_fast_before_any_work(baseline: Path, tmp_path: Path) -> None:
    repo = clone(baseline, tmp_path / "repo")
    before, lock = outputs(repo), (repo / "dvc.lock").read_bytes()
    uri = f"http://127.0.0.1:{free_port()}"
    expected = f"train@linear: MLflow tracking server at {uri} is not reachable ("
    set_params(repo, {"linear.epochs": 3})
    start = time.monotonic()
    proc = dvc(repo, "repro", check=False, env=run_env(MLFLOW_TRACKING_URI=uri))
    seconds = time.monotonic() - start
    text = output_of(proc)
    assert proc.returncode != 0
    assert expected in text and "unset MLFLOW_TRACKING_URI to use the local store" in text and "Traceback" not in text
    assert_untouched(repo, before, lock)
    assert not (repo / "mlflow.db").exists()
    print(f"\nserver down: `dvc repro` gave up after {seconds:.1f} s (generate up to date, train@linear stopped)")

    # The data is checked against truth.json's digests first (no run is opened for data that is not generate's),
    # then the store, before the data is read: with the data gone, that is what is reported, alone.
    (repo / "data" / "train.parquet").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "stages", "train", "linear"], cwd=repo, env=run_env(MLFLOW_TRACKING_URI=uri),
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1 and proc.stderr.startswith("train@linear: data/train.parquet: missing") and uri not in proc.stderr


# ---------------------------------------------------------------- many stages on a fresh store


WORKER = """
import sys, time
from pathlib import Path
from pipeline import tracking
print("ready", flush=True)
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.005)
with tracking.stage_run("worker", "regression", {"worker": sys.argv[2]}, f"worker {sys.argv[2]}") as run:
    run.log_params({"worker": sys.argv[2]})
    run.log_metrics({"value": float(sys.argv[2])})
"""


@pytest.mark.slow
def test_many_stages_starting_at_once_on_a_fresh_store(tmp_path: Path, spawn: Any) -> None:
    """Three processes open a store that does not exist yet at the same instant: all runs land, one experiment."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    go = tmp_path / "go"
    env = run_env(PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    workers = [spawn([sys.executable, "-c", WORKER, str(go), str(i)], tmp_path, env) for i in range(3)]
    for w in workers:  # every worker has imported mlflow and waits: then they all start together
        assert w.stdout.readline().strip() == "ready"
    assert not (tmp_path / "mlflow.db").exists()
    go.touch()
    for w in workers:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "regression"]
    found = client.search_runs([exp.experiment_id])
    assert sorted(r.data.params["worker"] for r in found) == [str(i) for i in range(3)]
    assert {r.info.status for r in found} == {"FINISHED"}


# ---------------------------------------------------------------- no secrets


@pytest.mark.slow
def test_no_secret_from_the_environment_is_logged(baseline: Path) -> None:
    """Tokens/passwords in the stages' environment and in the git remote URL appear nowhere in the store."""
    secrets = [*SECRETS.values(), REMOTE_TOKEN]
    store = [baseline / "mlflow.db", *(p for p in (baseline / "mlartifacts").rglob("*") if p.is_file())]
    blobs = {str(p): p.read_bytes() for p in store}
    assert any(b"train@mlp" in blob for blob in blobs.values())  # the scan does see what was logged
    for path, blob in blobs.items():
        for secret in secrets:
            assert secret.encode() not in blob, f"{secret} found in {path}"
    for run in runs(baseline):
        logged = json.dumps([run.data.params, run.data.tags])
        assert not [s for s in secrets if s in logged]
        assert "5ecret" not in logged
        if url := run.data.tags.get("mlflow.source.git.repoURL"):
            assert url == "https://example.invalid/team/pipeline.git"
