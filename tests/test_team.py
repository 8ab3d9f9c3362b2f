"""Working as a team: the pipeline logs through a real `mlflow server`, and data moves through a DVC remote."""

from __future__ import annotations

import dataclasses
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    SYNC, Server, background, clone, create_user, dvc, files_holding, free_port, mlflow_server, model_names,
    pipeline_stages, predict_rest, run_env, set_params, sh, warm_log,
)


pytestmark = pytest.mark.slow

STAGES = set(pipeline_stages())
ADMIN = ("admin", "Admin-pass-for-tests-1")


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One basic-auth `mlflow server` (scripts/mlflow-server.sh --auth) for the module's two tests of it, each with
    users and an experiment of its own; each test changes only its own copy (dataclasses.replace) of what it yields."""
    with mlflow_server(tmp_path_factory.mktemp("auth") / "server", "--auth", MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN[1],
                       MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret-key") as server:
        yield server


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


def test_basic_auth_server_needs_credentials(project: Path, auth_server: Server) -> None:
    """With --auth, anonymous requests and stages are refused in one line; a created user can log."""
    server, admin = dataclasses.replace(auth_server), ADMIN
    set_params(project, {"mlflow.experiment": "auth"})  # the other test of the server logs to `regression`
    with pytest.raises(urllib.error.HTTPError) as refused:
        server.api("experiments/search", max_results="1")
    assert refused.value.code == 401
    carol = ("carol", "Carol-pass-for-tests-1")
    server.request("/api/2.0/mlflow/users/create", {"username": carol[0], "password": carol[1]}, auth=admin)

    anonymous = sh(project, "python", "-m", "stages", "generate", check=False, env=run_env(MLFLOW_TRACKING_URI=server.url))
    assert anonymous.returncode == 1
    assert "HTTP 401" in anonymous.stderr and "MLFLOW_TRACKING_USERNAME" in anonymous.stderr
    assert "Traceback" not in anonymous.stderr

    sh(project, "python", "-m", "stages", "generate", env=run_env(
        MLFLOW_TRACKING_URI=server.url, MLFLOW_TRACKING_USERNAME=carol[0], MLFLOW_TRACKING_PASSWORD=carol[1]))
    server.auth = carol
    exp = server.api("experiments/get-by-name", experiment_name="auth")["experiment"]
    runs = server.api("runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert [(r["info"]["run_name"], r["info"]["user_id"]) for r in runs] == [("generate", "carol")]
    # a worker trusts a password it checked for 60 s (each check is a slow hash by design): a wrong one still fails
    assert "\nauth_cache_ttl_seconds = 60\n" in (server.folder / "basic_auth.ini").read_text()
    server.auth = (carol[0], carol[1] + "-wrong")
    with pytest.raises(urllib.error.HTTPError) as wrong:
        server.api("experiments/get-by-name", experiment_name="auth")
    assert wrong.value.code == 401


def test_non_admin_user_runs_registers_and_serves_with_the_password_in_the_uri(
    project: Path, auth_server: Server, tmp_path: Path,
) -> None:
    """docs/team.md's path for a user who is not an admin, end to end on a basic-auth server, the password inside
    MLFLOW_TRACKING_URI: generate -> train -> evaluate (the registry included) -> compare, sync -> serve the champion.
    Nothing is spooled; the password is in no output, log, run, tag, param or file. A second user refused by the
    registry mid-run gets one line, and nothing is spooled as an outage."""
    admin, alice, bob = ADMIN, ("alice", "Alice-uri-Pass-9z"), ("bob", "Bob-env-Pass-4k")
    server = dataclasses.replace(auth_server)
    create_user(server, admin, alice)
    create_user(server, admin, bob)
    server.auth = alice
    # Why the registry asks for the model when its alias is refused: to a user who is not an admin, MLflow's auth app
    # answers 403 for the alias of a model that does not exist, 404 for the model (fails if MLflow changes that).
    for endpoint, query, status in (("registered-models/alias", {"alias": "champion"}, 403), ("registered-models/get", {}, 404)):
        with pytest.raises(urllib.error.HTTPError) as absent:
            server.api(endpoint, name="regression-mlp", **query)
        assert absent.value.code == status, endpoint

    host = server.url.removeprefix("http://")
    shown = f"http://***@{host}"
    as_alice = run_env(MLFLOW_TRACKING_URI=f"http://{alice[0]}:{alice[1]}@{host}")
    outputs = [dvc(project, "repro", env=as_alice).stdout]
    assert f"🏃 View run evaluate at: {shown}/#/experiments/" in outputs[0], outputs[0]
    for model in model_names():
        assert f"registry: regression-{model} v1: first champion" in outputs[0], outputs[0]
    assert not (project / ".mlflow-spool").exists()

    exp = server.api("experiments/get-by-name", experiment_name="regression")["experiment"]
    runs = server.api("runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 50})["runs"]
    assert sorted((r["info"]["run_name"], r["info"]["status"], r["info"]["user_id"]) for r in runs) == sorted(
        (stage, "FINISHED", "alice") for stage in pipeline_stages())
    for model in model_names():  # alice created each registered model, so she manages it, and its champion is v1
        name = f"regression-{model}"
        assert server.api("registered-models/alias", name=name, alias="champion")["model_version"]["version"] == "1"
        query = urllib.parse.urlencode({"username": "alice", "resource_type": "registered_model", "resource_id": name})
        grant = json.loads(server.request(f"/api/3.0/mlflow/users/permissions/get?{query}", auth=admin))
        assert grant["permission"] == "MANAGE", grant

    compare = sh(project, sys.executable, "-m", "pipeline.compare", env=as_alice)
    assert all(f"train@{m}" in compare.stdout for m in model_names()), compare.stdout
    synced = sh(project, *SYNC, env=as_alice)
    assert synced.stdout == f"sync: nothing to sync in .mlflow-spool/; the store at {shown} answers\n", synced.stdout
    outputs += [compare.stdout + compare.stderr, synced.stdout + synced.stderr]

    # bob may edit the experiment but only read alice's registered models: his new training run's model cannot be
    # registered; evaluate says so in one line, and spools nothing (the server answered: no outage)
    server.request("/api/3.0/mlflow/users/permissions/grant", {"username": "bob", "resource_type": "experiment",
                   "resource_id": exp["experiment_id"], "permission": "EDIT"}, auth=admin)
    as_bob = run_env(MLFLOW_TRACKING_URI=server.url, MLFLOW_TRACKING_USERNAME=bob[0], MLFLOW_TRACKING_PASSWORD=bob[1])
    first = model_names()[0]  # evaluate registers the models in params.yaml's order: the first is refused
    sh(project, sys.executable, "-m", "stages", "train", first, env=as_bob)
    refused = sh(project, sys.executable, "-m", "stages", "evaluate", check=False, env=as_bob)
    hand, line = refused.stderr.splitlines()  # a stage run by hand names its run first
    assert refused.returncode == 1 and hand.startswith("evaluate: run by hand") and line == (
        f"evaluate: MLflow server at {server.url} answered HTTP 403 when running register_model for model {first}: "
        "a permission problem (not an outage); user 'bob' may not write here: ask an admin for EDIT permission on "
        f"registered model regression-{first}, or log in as a user who has it"
    ), refused.stderr
    assert not (project / ".mlflow-spool").exists()
    evaluates = [r for r in server.api("runs/search", {"experiment_ids": [exp["experiment_id"]],
                                                       "filter": "tags.stage = 'evaluate'"})["runs"]
                 if r["info"]["user_id"] == "bob"]
    assert [r["info"]["status"] for r in evaluates] == ["FAILED"], evaluates
    assert "HTTP 403" in {t["key"]: t["value"] for t in evaluates[0]["data"]["tags"]}["closed.reason"]

    port = free_port()
    log = tmp_path / "serve.log"
    import pandas as pd

    rows = pd.read_parquet(project / "data" / "test.parquet").drop(columns="y").to_numpy(dtype="float32")[:3].tolist()
    with open(project / "plots" / "predictions" / "mlp.csv") as fh:
        expected = [float(line.split(",")[1]) for line in fh.read().splitlines()[1:4]]
    with background([sys.executable, "-m", "pipeline.serve", "mlp"], f"http://127.0.0.1:{port}/ping", log, project,
                    as_alice | {"PORT": str(port)}):
        assert predict_rest(f"http://127.0.0.1:{port}", rows) == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert f"serve: regression-mlp version 1 (alias @champion) from {shown}" in log.read_text(), log.read_text()

    # the project, the logs, the server's store (every run, tag, param) and its log
    leaks = files_holding(alice[1], tmp_path, server.folder.parent)
    assert leaks == [] and not any(alice[1] in text for text in (*outputs, warm_log())), leaks


def test_dvc_remote_fresh_clone_is_up_to_date(baseline: Path, tmp_path: Path) -> None:
    """A reproduced project pushes to a folder remote; a fresh clone pulls and finds nothing to recompute."""
    remote = tmp_path / "dvc-remote"
    project = clone(baseline, tmp_path / "repo")  # the suite's repro, its outputs in the DVC cache
    dvc(project, "remote", "add", "-d", "storage", str(remote))
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "pipeline outputs and remote")
    pushed = dvc(project, "push")
    assert any(remote.rglob("*")), pushed.stdout

    fresh = tmp_path / "fresh"
    sh(tmp_path, "git", "clone", "-q", str(project), str(fresh))
    assert not (fresh / "models" / "mlp.safetensors").exists()
    dvc(fresh, "pull")
    for out in ("data/train.parquet", "models/mlp.safetensors", "metrics/evaluation/mlp.json"):
        assert (fresh / out).read_bytes() == (project / out).read_bytes(), out
    status = dvc(fresh, "status")
    assert "Data and pipelines are up to date." in status.stdout, status.stdout
    repro = dvc(fresh, "repro")
    assert "Running stage" not in repro.stdout, repro.stdout
    assert not (fresh / "mlflow.db").exists()  # no stage ran, so nothing was logged
