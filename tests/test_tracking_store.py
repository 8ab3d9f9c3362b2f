"""pipeline/tracking/store.py: /health asked once per stage process, the wait for a server that is down, permissions."""

from __future__ import annotations

import shutil
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bench.workspace import free_port
from pipeline.tracking import store


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


def _health_on(port: int) -> ThreadingHTTPServer:
    """A server answering /health on `port`, serving from a thread."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def health_server() -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server on 127.0.0.1 that answers /health and records each request path."""
    hits: list[str] = []

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            hits.append(self.path)
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def test_preflight_then_the_run_ask_health_once(health_server: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    uri, hits = health_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(store, "_answered", set())
    assert store.preflight() == uri  # the stage's pre-flight
    store.use_server(uri)  # what connect() does when the run starts
    store.open_existing(uri)  # and a reader in the same process
    assert hits == ["/health"]


def test_a_server_that_is_down_fails_in_one_line_and_is_asked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    down = "http://127.0.0.1:9"  # the discard port: nothing listens on it here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    monkeypatch.setattr(store, "_answered", set())
    with pytest.raises(store.StoreUnreachable, match=rf"MLflow tracking server at {down} is not reachable"):
        store.preflight()
    assert down not in store._answered  # a failed check is asked again next time


def test_a_server_that_comes_back_within_the_wait_costs_nothing(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """mlflow.wait_seconds: one line when the wait starts, then the stage goes on once /health answers."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(store, "_answered", set())
    monkeypatch.setattr(store, "WAIT_POLL", 0.2)
    with pytest.raises(store.StoreUnreachable, match="not reachable"):
        store.preflight(0, "train@linear")  # no wait: at once
    assert capsys.readouterr().err == ""
    late = threading.Timer(1.5, lambda: started.append(_health_on(port)))
    started: list[ThreadingHTTPServer] = []
    late.start()
    try:
        begin = time.monotonic()
        assert store.preflight(30, "train@linear") == uri
        assert 1.0 < time.monotonic() - begin < 15
    finally:
        late.join()
        for server in started:
            server.shutdown()
            server.server_close()
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"train@linear: MLflow tracking server at {uri} is not reachable (") and \
        line.endswith("waiting up to 30 s for it (mlflow.wait_seconds)"), line


def test_the_wait_ends_in_the_one_line_failure(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    monkeypatch.setattr(store, "_answered", set())
    monkeypatch.setattr(store, "WAIT_POLL", 0.2)
    with pytest.raises(store.StoreUnreachable, match=r"is not reachable .*\(waited 1 s, mlflow.wait_seconds\)$"):
        store.preflight(1, "generate")
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_sync_with_an_empty_spool_still_checks_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.tracking import spool

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setattr(store, "_answered", set())
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert spool.sync_spool() == [f"sync: nothing to sync in .mlflow-spool/; the store at sqlite:///{tmp_path}/mlflow.db answers"]
    down = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    assert spool.main([]) == 1  # the store is down: said, even with nothing to replay


def test_permission_errors_are_told_apart_from_outages() -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

    assert store.permission_status(MlflowException("no", error_code=PERMISSION_DENIED)) == 403
    assert store.permission_status(MlflowException("API request failed with error code 503 != 200")) is None
    assert store.failure_reason("Max retries exceeded (Caused by ResponseError('too many 503 error responses'))") == "HTTP 503"
    line = str(store.permission_refused("http://h", 403, "creating a run in experiment 'x'"))
    assert "permission problem (not an outage)" in line and "refused the request" not in line


# ---------------------------------------------------------------- a store being created is waited for


def _half_made_store(path: Path) -> None:
    """What MLflow leaves between creating its tables and stamping their schema version: tables, no alembic_version."""
    with closing(sqlite3.connect(path)) as con:
        con.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY)")
        con.commit()


def _in_thread(call: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    """Start `call` in a thread; the dict gets its result ('value') or its exception ('error')."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["value"] = call()
        except Exception as exc:  # noqa: BLE001 - handed to the test, which asserts on it
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


@pytest.fixture
def fresh_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workspace with no store yet, whose embedded store (tmp_path/mlflow.db) the tracking code uses."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return tmp_path


def test_preflight_and_readers_wait_for_a_store_being_created(fresh_workspace: Path) -> None:
    """Issue 28, case 6: a half-made store is "not an MLflow database" to a check that does not wait; while its
    creator holds the store lock, pre-flight and readers wait, then find the whole store."""
    from mlflow.tracking import MlflowClient

    db = fresh_workspace / "mlflow.db"
    _half_made_store(db)
    with pytest.raises(store.TrackingError, match=r"is not an MLflow database \(no schema version\)"):
        store.check_sqlite_store(db)  # what a check that does not wait for the creator would say
    whole = fresh_workspace / "elsewhere" / "mlflow.db"
    whole.parent.mkdir()
    MlflowClient(f"sqlite:///{whole}").search_experiments()  # a store MLflow finished creating
    with store.store_lock(db):  # the creator (connect) holds it from the empty file to the last migration
        waiting = [_in_thread(store.preflight), _in_thread(lambda: store.open_existing(store.tracking_uri()))]
        time.sleep(1.0)
        assert all(thread.is_alive() for thread, _ in waiting), [out for _, out in waiting]  # waiting on the lock
        shutil.copy(whole, db)  # creation ends
    for thread, out in waiting:
        thread.join(timeout=60)
        assert not thread.is_alive() and "error" not in out, out
    assert waiting[0][1]["value"] == f"sqlite:///{db}"


def test_store_is_created_under_the_lock_preflight_takes(fresh_workspace: Path) -> None:
    """connect() creates the store only once it holds the lock pre-flight waits on (one lock file, beside the store)."""
    db = fresh_workspace / "mlflow.db"
    with store.store_lock(db):
        thread, out = _in_thread(lambda: store.connect("created-under-the-lock"))
        time.sleep(1.0)
        assert thread.is_alive() and not db.exists(), out  # not one byte before it has the lock
    thread.join(timeout=120)
    assert not thread.is_alive() and "error" not in out, out
    assert (fresh_workspace / "mlflow.db.lock").exists() and not list(fresh_workspace.glob("*.broken"))
    store.check_sqlite_store(db)  # whole: schema version stamped
    client, experiment_id = out["value"]  # type: ignore[misc]
    assert client.get_experiment(experiment_id).name == "created-under-the-lock"


def test_the_private_schema_lookup_matches_a_store_made_through_the_public_api(tmp_path: Path) -> None:
    """store._schema_head is the one private MLflow call: a store MlflowClient creates must carry its revision."""
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'new.db'}").search_experiments()  # creates the store at this MLflow's schema
    with closing(sqlite3.connect(tmp_path / "new.db")) as con:
        (made,) = con.execute("SELECT version_num FROM alembic_version").fetchone()
    assert store._schema_head() == made


def _store_dump(path: Path) -> tuple[object, ...]:
    """A SQLite store's schema (each table's lines in any order: MLflow's migrations recreate some tables with their
    constraints in another order each time), version, experiments (but their times) and row counts."""
    with closing(sqlite3.connect(path)) as con:
        tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return (sorted((kind, name, table, sorted(line.strip().rstrip(",") for line in (sql or "").splitlines()))
                       for kind, name, table, sql in con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")),
                con.execute("SELECT version_num FROM alembic_version").fetchall(),
                con.execute("SELECT experiment_id, name, artifact_location, lifecycle_stage FROM experiments").fetchall(),
                {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables})


def test_a_new_store_is_the_store_mlflow_makes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new SQLite store is a copy of an empty one kept in the venv (made once by `mlflow db upgrade`): once MLflow
    opens it, it is the store MLflow makes itself, Default experiment included, but for the times."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setattr("sys.prefix", str(tmp_path / "venv"))  # a venv without the empty store yet
    monkeypatch.chdir(tmp_path)  # where MLflow puts the Default experiment's artifacts: the same for both
    store.new_sqlite_store(tmp_path / "copied.db")
    (empty,) = (tmp_path / "venv" / "share" / "regression-pipeline").iterdir()
    made = empty.stat().st_mtime_ns
    with closing(sqlite3.connect(empty)) as con:
        assert con.execute("SELECT count(*) FROM experiments").fetchone() == (0,)  # MLflow adds Default on opening
    for name in ("copied.db", "made.db"):
        MlflowClient(f"sqlite:///{tmp_path / name}").search_experiments()
    assert _store_dump(tmp_path / "copied.db") == _store_dump(tmp_path / "made.db")
    store.new_sqlite_store(tmp_path / "again.db")  # the empty store is made once
    assert empty.stat().st_mtime_ns == made and (tmp_path / "again.db").read_bytes() == empty.read_bytes()
    assert not [p.name for p in (*tmp_path.iterdir(), *empty.parent.iterdir()) if p.suffix not in (".db", "")]  # no part left

    monkeypatch.setattr("sys.prefix", sys.base_prefix)  # no venv: nothing kept, MLflow makes the store
    store.new_sqlite_store(tmp_path / "outside.db")
    assert not (tmp_path / "outside.db").exists()


@pytest.mark.parametrize("write", ["experiment tag", "dataset"])
def test_stages_writing_the_same_row_at_once_all_succeed(write: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Queued experiments save the same runs-table view, and log the same data file as a dataset, together; MLflow's
    SQL store looks, then inserts, so the second writer of a new row hit the table's unique key and its run went to
    the spool (both seen in clean-clone runs). The stages' writes (store.once_more_if_raced) write again."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.run import StageRun

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # where a spool would go
    clients = [MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}") for _ in range(4)]
    exp_id = clients[0].create_experiment("regression")
    rounds = 40 if write == "experiment tag" else 10  # a new row each round (a new digest: a new dataset)
    runs = [[StageRun(c, c.create_run(exp_id).info.run_id, exp_id) for _ in range(rounds)] if write == "dataset" else []
            for c in clients]
    failures: list[BaseException] = []
    start = threading.Barrier(len(clients))

    def writer(client: MlflowClient, stage_runs: list[StageRun]) -> None:
        for k in range(rounds):
            start.wait()
            try:
                if write == "experiment tag":
                    store.set_experiment_tag(client, exp_id, f"mlflow.sharedViewState.v{k}", f'{{"n": {k}}}')
                else:
                    stage_runs[k].log_dataset(tmp_path / "train.parquet", "train", f"{k:032x}", "training", 10)
            except BaseException as exc:  # noqa: BLE001 - every failure is the test's finding
                failures.append(exc)

    threads = [threading.Thread(target=writer, args=(c, r)) for c, r in zip(clients, runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    assert not (tmp_path / ".mlflow-spool").exists(), [r.spool_reason for rs in runs for r in rs if r.spool]
    if write == "experiment tag":
        tags = clients[0].get_experiment(exp_id).tags
        assert all(tags[f"mlflow.sharedViewState.v{k}"] == f'{{"n": {k}}}' for k in range(rounds))
    else:
        for stage_runs in runs:
            for k, run in enumerate(stage_runs):
                (found,) = clients[0].get_run(run.run_id).inputs.dataset_inputs
                assert found.dataset.digest == f"{k:032x}"


def test_a_sync_that_cannot_look_its_run_up_stops_instead_of_making_a_second_one(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """spool._store_run: only a store that says the run does not exist (it was replaced) gets a new run; a store that
    fails to answer (busy, a server error) stops the sync, so the run it holds is not copied a second time."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import spool

    store.new_sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = client.create_experiment("regression")
    run = client.create_run(exp_id, run_name="train@linear")
    folder = tmp_path / "spooled"
    folder.mkdir()

    def busy(run_id: str) -> None:
        raise MlflowException("database is locked", error_code="TEMPORARILY_UNAVAILABLE")

    with monkeypatch.context() as mp:
        mp.setattr(client, "get_run", busy)
        with pytest.raises(MlflowException, match="database is locked"):
            spool._store_run(client, exp_id, run, folder, {"run_id": run.info.run_id})
    assert [r.info.run_id for r in client.search_runs([exp_id])] == [run.info.run_id]  # no second copy
    assert spool._store_run(client, exp_id, run, folder, {"run_id": run.info.run_id}) == run.info.run_id
    gone = spool._store_run(client, exp_id, run, folder, {"run_id": "0" * 32})  # a replaced store: a new run
    assert gone != run.info.run_id and len(client.search_runs([exp_id])) == 2
