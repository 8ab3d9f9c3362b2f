"""pipeline/tracking/store.py: /health asked once per stage process, the wait for a server that is down, permissions."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
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
