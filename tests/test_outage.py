"""When MLflow fails: a server killed mid-training, a killed stage, a broken store, interruptions.

Real parts throughout: `dvc repro` in a throwaway git+DVC copy, a real `mlflow server`
killed by process group, the real SQLite store damaged, locked or made read-only.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from pipeline import config, tracking
from pipeline.files import round_sig
from stages import __main__ as entry
from stages import paths
from tests.helpers import (
    SYNC, copy_project, copy_with_store, differences, dvc, free_port, group_alive, mlflow_server_command, run_env, set_params, sh,
    start_background, statuses, stop_group, store_content, wait_for_running,
)

TRAIN_OUTS = ("models/mlp.safetensors", "plots/loss/mlp.csv", "metrics/train/mlp.json")


def _server(folder: Path, port: int) -> subprocess.Popen[bytes]:
    """scripts/mlflow-server.sh on `port` with its store in `folder`, in its own process group, once healthy."""
    cmd, env = mlflow_server_command(folder, port)
    return start_background(cmd, f"http://127.0.0.1:{port}/health", folder.parent / f"{folder.name}.log", env=env)


def _server_runs(uri: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.slow
def test_server_killed_mid_training_keeps_the_work_and_sync_finishes_the_run(
    tmp_path: Path, spawn: Any, stage_start: str,
) -> None:
    repo = copy_project(tmp_path / "repo", {"data.n_samples": 20000, "mlp.epochs": 60, "mlp.patience": 100})
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = run_env(MLFLOW_TRACKING_URI=uri)
    server = _server(tmp_path / "server", port)
    try:
        dvc(repo, "repro", "generate", env=env)
        job = spawn([sys.executable, "-m", "dvc", "repro", "train@mlp"], repo, env)
        deadline = time.monotonic() + 300
        while not any(r.info.status == "RUNNING" and "generate.run_id" in r.data.tags for r in _server_runs(uri)):
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.5)
        os.killpg(server.pid, signal.SIGKILL)  # the whole server, workers included, mid-training (after the link)
        server.wait()
        out, err = job.communicate(timeout=600)
    finally:
        stop_group(server)
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
        synced = sh(repo, *SYNC, env=env)
        assert f"train@mlp: run {run_id} synced as FINISHED" in synced.stdout and "1 model" in synced.stdout
        assert not any((repo / tracking.SPOOL_DIR).iterdir())
        (run,) = [r for r in _server_runs(uri) if r.info.run_id == run_id]
        assert run.info.status == "FINISHED" and run.info.end_time > run.info.start_time
        metrics = json.loads((repo / "metrics/train/mlp.json").read_text())
        assert round_sig(run.data.metrics["best_val_loss"]) == metrics["best_val_loss"]  # the DVC file: rounded
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        assert len(client.get_metric_history(run_id, "val_loss")) == metrics["steps_run"]
        assert {a.path for a in client.list_artifacts(run_id)} >= {"weights"}
        (model,) = client.search_logged_models([run.info.experiment_id])
        assert model.source_run_id == run_id
        import mlflow.pyfunc
        import numpy as np

        mlflow.set_tracking_uri(uri)
        loaded = mlflow.pyfunc.load_model(f"models:/{model.model_id}")  # the replayed model loads from the server
        assert loaded.predict(np.zeros((2, 10), dtype=np.float32)).shape == (2, 1)
        assert (repo / TRAIN_OUTS[0]).stat().st_mtime == mtime and np.isfinite(metrics["best_val_loss"])
    finally:
        stop_group(server)
    assert not group_alive(server.pid)


@pytest.mark.slow
def test_sigkilled_stage_is_closed_by_the_next_stage_start_and_counted_by_compare(baseline: Path, tmp_path: Path, spawn: Any) -> None:
    repo = copy_with_store(baseline, tmp_path / "repo")
    set_params(repo, {"linear_gd.steps": 1_000_000})

    def kill_training() -> None:
        job = spawn([sys.executable, "-m", "stages", "train", "linear_gd"], repo)
        wait_for_running(repo, "train@linear_gd", job)
        os.kill(job.pid, signal.SIGKILL)  # as the OOM killer does: no handler runs
        job.communicate()

    kill_training()
    assert statuses(repo)["train@linear_gd"] == ["FINISHED", "RUNNING"]
    sh(repo, sys.executable, "-m", "stages", "train", "linear")  # the next start of any stage closes it
    assert statuses(repo)["train@linear_gd"] == ["FINISHED", "KILLED"]
    kill_training()
    assert statuses(repo)["train@linear_gd"] == ["FINISHED", "KILLED", "RUNNING"]
    proc = sh(repo, sys.executable, "-m", "pipeline.compare")
    assert "compare: closed 1 run(s) whose process had died" in proc.stderr
    assert statuses(repo)["train@linear_gd"] == ["FINISHED", "KILLED", "KILLED"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    killed = [r for r in client.search_runs(["1"]) if r.info.status == "KILLED"]
    assert all("was gone when" in r.data.tags["closed.reason"] and r.info.end_time for r in killed)
    assert {r.data.tags["closed.reason"].split(" when ")[1].split(" ")[0] for r in killed} == {"train@linear", "compare"}
    assert list(repo.glob("mlflow.db.*.bak"))  # backed up before the store was repaired
    set_params(repo, {"linear_gd.steps": 30})
    assert "up to date" in dvc(repo, "status").stdout  # nothing was retrained or lost


def _damage(db: Path) -> None:
    with open(db, "r+b") as fh:
        fh.write(b"\0" * 100)  # the header of the first page


def _wrong_schema(db: Path) -> None:
    with sqlite3.connect(db) as con:
        con.execute("UPDATE alembic_version SET version_num = 'abc123'")


BROKEN = [
    ("damaged", _damage, "file is not a database", "move it aside"),
    ("wrong-schema", _wrong_schema, "has schema abc123", "./tasks.sh sync --upgrade-store"),
]


@pytest.mark.slow
@pytest.mark.bad_input
@pytest.mark.parametrize(("name", "damage", "cause", "todo"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_store_fails_in_one_line_before_any_output(baseline: Path, tmp_path: Path, name: str, damage: Any, cause: str, todo: str) -> None:
    repo = copy_with_store(baseline, tmp_path / "repo")
    db = repo / "mlflow.db"
    damage(db)
    data = {p: p.stat().st_mtime_ns for p in (repo / "data").iterdir()}
    for cmd, prefix in ((["stages", "generate"], "generate"), (["pipeline.compare"], "compare")):
        start = time.monotonic()
        proc = sh(repo, sys.executable, "-m", *cmd, check=False)
        print(f"\n{name} store: {prefix} answered in {time.monotonic() - start:.1f} s")  # the bound is 10 s
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        (line,) = proc.stderr.splitlines()
        assert line.startswith(f"{prefix}: MLflow store {db}") and cause in line and todo in line, line
    assert {p: p.stat().st_mtime_ns for p in (repo / "data").iterdir()} == data  # generate wrote nothing


@pytest.mark.slow
@pytest.mark.bad_input
def test_unwritable_and_locked_store_fail_in_one_line(baseline: Path, tmp_path: Path) -> None:
    repo = copy_with_store(baseline, tmp_path / "repo")
    db = repo / "mlflow.db"
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")  # another process writing for a long time
    try:
        proc = sh(repo, sys.executable, "-m", "stages", "generate", check=False)
    finally:
        con.close()
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        f"generate: MLflow store {db} cannot be used (database is locked); another process held it for 5 s; "
        f"wait for it to finish (`fuser {db}` names it)"
    ]
    if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root on a filesystem with attributes)")
    try:
        proc = sh(repo, sys.executable, "-m", "stages", "generate", check=False)
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True)
    (line,) = proc.stderr.splitlines()
    assert proc.returncode == 1 and "attempt to write a readonly database" in line and "lsattr" in line


@pytest.mark.slow
def test_a_store_locked_mid_run_is_one_line_without_mlflow_tracebacks(
    baseline: Path, tmp_path: Path, spawn: Any, stage_start: str,
) -> None:
    repo = copy_with_store(baseline, tmp_path / "repo")
    set_params(repo, {"mlp.epochs": 60, "mlp.patience": 60, "mlp.batch_size": 8})  # still training once RUNNING
    stage = spawn([sys.executable, "-m", "stages", "train", "mlp"], repo)
    wait_for_running(repo, "train@mlp", stage)
    con = sqlite3.connect(repo / "mlflow.db", isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")  # another process holds the store past MLflow's 20 s busy timeout
    try:
        _, err = stage.communicate(timeout=600)
    finally:
        con.close()
    # its progress lines (one every few seconds of a long training: pipeline/tracking/live.py) aside
    lines = [ln for ln in err.splitlines() if not re.match(r"train@mlp: epoch \d+/\d+, val loss ", ln)]
    assert stage.returncode == 0 and "Traceback" not in err and "SQLAlchemy" not in err, err[:3000]
    assert len(lines) == 2 and lines[1].startswith("train@mlp: run by hand"), err[:3000]
    assert lines[0].startswith("train@mlp: the MLflow store failed during the run (database is locked); the run "
                               "(FINISHED) is kept in .mlflow-spool/"), lines[0]
    assert all((repo / out).is_file() for out in TRAIN_OUTS)


def test_interruption_message_names_the_outputs_already_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """SIGTERM in each phase: before any output, and after the weights (while logging)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config, "load", lambda: SimpleNamespace(models=("mlp",)))  # only the models list is read
    stage = ModuleType("stages.fake")  # the dispatcher imports the stage only after params.yaml is read
    outs = [paths.weights_path("mlp"), paths.loss_plot_path("mlp")]
    stage.outputs = lambda _model: outs
    monkeypatch.setattr(entry, "load_stage", lambda _stage, _cfg: stage)
    old = tmp_path / outs[1]
    old.parent.mkdir(parents=True)
    old.write_text("from an earlier run")
    os.utime(old, (0, 0))

    def body(written: list[Path]) -> Any:
        def run(_cfg: Any, _model: str) -> None:
            for path in written:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("new")
            os.kill(os.getpid(), signal.SIGTERM)
        return run

    for written, expected in (
        ([], "train@mlp: interrupted (stopped by signal SIGTERM); no output was written"),
        ([outs[0]], "train@mlp: interrupted (stopped by signal SIGTERM); already written: models/mlp.safetensors "
                    "(DVC does not record them; the next `dvc repro` runs the stage again)"),
    ):
        stage.run = body(written)
        with pytest.raises(SystemExit) as stop:
            entry.main(["train", "mlp"])
        assert stop.value.code == 130
        assert capsys.readouterr().err.strip() == expected
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _FailingClient:
    """An MlflowClient that raises MLflow's error at its `fail_at`-th call (0: never), and records every call."""

    def __init__(self, client: Any, fail_at: int, calls: list[str]) -> None:
        self._client, self._fail_at, self._calls = client, fail_at, calls

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self._calls.append(name)
            if len(self._calls) == self._fail_at:
                from mlflow.exceptions import MlflowException

                raise MlflowException(f"injected failure at call {self._fail_at} ({name})")
            return attr(*args, **kwargs)

        return call


def _evaluate_in_process(repo: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int, calls: list[str]) -> str:
    """Run stages/evaluate.py in-process in `repo`, its store client failing at call `fail_at`; then sync. Output."""
    from pipeline.tracking import run as run_module
    from pipeline.tracking import spool
    from stages import evaluate

    real_connect = run_module.connect
    with monkeypatch.context() as mp:
        mp.chdir(repo)
        mp.delenv("DVC_ROOT", raising=False)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setattr(run_module, "connect", lambda exp: (lambda c, e: (_FailingClient(c, fail_at, calls), e))(*real_connect(exp)))
        evaluate.run(config.load())
        mp.setattr(run_module, "connect", real_connect)
        spooled = spool.spool_folders()
        assert bool(spooled) == bool(fail_at), "a failure must spool the run, and only a failure"
        return "\n".join(spool.sync_spool())


@pytest.fixture(scope="module")
def unscored(baseline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reproduced project with its registry emptied: the next evaluate registers and promotes afresh."""
    repo = copy_with_store(baseline, tmp_path_factory.mktemp("unscored") / "repo")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    for model in client.search_registered_models():
        client.delete_registered_model(model.name)
    return repo


@pytest.mark.slow
def test_store_failing_at_each_evaluate_operation_loses_nothing_after_sync(
    unscored: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """The store fails at each kind of call evaluate makes, in turn (its first call of each kind, and the
    first call of every operation that reaches other runs: the generate link, the metrics and picture copied
    onto each training run, the registry); the stage still writes everything, and after `sync` the store holds
    what an undisturbed evaluate leaves: the same runs, metrics (history lengths too), tags, artifacts,
    registered versions and champions."""
    calls: list[str] = []
    reference = copy_with_store(unscored, tmp_path / "reference")
    _evaluate_in_process(reference, monkeypatch, 0, calls)
    expected = _store_content(reference)
    assert any(t.startswith("registry.") for r in expected["runs"] for t in r["tags"])  # the registry step ran
    assert {"generate.run_id", "scored.mlp.run_id"} <= set(expected["runs"][-1]["tags"])
    points = sorted({calls.index(name) + 1 for name in calls} | {i + 1 for i, name in enumerate(calls) if name == "search_runs"})
    assert len(points) >= 8, calls
    for fail_at in points:
        repo = copy_with_store(unscored, tmp_path / f"fail-{fail_at}")
        synced = _evaluate_in_process(repo, monkeypatch, fail_at, [])
        assert "synced as FINISHED" in synced, synced
        assert "injected failure" in capsys.readouterr().err  # the one line naming where the run is kept
        assert outputs_of(repo) == outputs_of(reference), f"failing at call {fail_at} ({calls[fail_at - 1]})"
        assert differences(_store_content(repo), expected) == [], f"failing at call {fail_at} ({calls[fail_at - 1]})"


def _store_content(repo: Path) -> dict[str, Any]:
    """The workspace store's content, as helpers.store_content compares it."""
    from mlflow.tracking import MlflowClient

    return store_content(MlflowClient(f"sqlite:///{repo / 'mlflow.db'}"), "regression")


def outputs_of(repo: Path) -> dict[str, bytes]:
    """evaluate's DVC outputs, by path."""
    return {str(p.relative_to(repo)): p.read_bytes() for folder in ("metrics/evaluation", "plots/predictions")
            for p in sorted((repo / folder).iterdir())}
