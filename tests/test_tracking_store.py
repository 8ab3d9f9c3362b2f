"""pipeline/tracking/store.py: a tracking server's /health is asked once per stage process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.tracking import store


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
