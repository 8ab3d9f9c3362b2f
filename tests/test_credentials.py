"""A tracking URI's credentials (`http://alice:<password>@host:port`) stay in the environment.

pipeline/tracking/store.py: `redact` is the one function that hides a URI's userinfo; the /health
check sends it as HTTP Basic auth, as MLflow's client does. With the server down, every command
says so in one line showing `http://***@host:port`. (With a real basic-auth server up:
tests/test_team.py, the non-admin user's pipeline.)
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest

from pipeline.tracking import spool, store
from tests.helpers import SYNC, clone, copy_project, dvc, free_port, pipeline_stages, run_env, sh

PASSWORD = "pw:with@odd/chars-7Q"  # quoted into the URI; what must never be printed or stored
USER = "al@ice"


def uri_with_credentials(port: int) -> str:
    return f"http://{quote(USER, safe='')}:{quote(PASSWORD, safe='')}@127.0.0.1:{port}"


def test_redact_hides_the_userinfo_of_every_uri_in_a_text() -> None:
    assert store.redact("http://alice:s3cret@127.0.0.1:5000") == "http://***@127.0.0.1:5000"
    assert store.redact("http://alice:p@ss@h:1/api failed; again https://b:x@h2/y") == \
        "http://***@h:1/api failed; again https://***@h2/y"  # the last @ of the host part ends the userinfo
    assert store.redact("postgresql+psycopg://mlflow:pw@db:5432/optuna") == "postgresql+psycopg://***@db:5432/optuna"
    for untouched in ("http://127.0.0.1:5000/#/experiments/1 has regression-mlp@champion",
                      "sqlite:////tmp/a@b/mlflow.db", "models:/regression-mlp@champion", "dev@example.invalid"):
        assert store.redact(untouched) == untouched
    error = store.TrackingError(f"MLflow server at {uri_with_credentials(5)} answered HTTP 500")
    assert str(error) == "MLflow server at http://***@127.0.0.1:5 answered HTTP 500"
    assert PASSWORD not in store.failure_reason(f"API request to {uri_with_credentials(5)}/api/2.0 failed with exception X")


@pytest.fixture
def guarded_health() -> Iterator[tuple[int, list[str]]]:
    """A real HTTP server on 127.0.0.1 that, like a proxy with basic auth, answers 401 to any request without
    credentials and 200 to /health with them; it records each request's path and Basic credentials."""
    seen: list[str] = []

    class Guarded(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            header = self.headers.get("Authorization", "")
            creds = base64.b64decode(header.removeprefix("Basic ")).decode() if header.startswith("Basic ") else ""
            seen.append(f"{self.path} {creds}")
            self.send_response(401 if not creds else 200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Guarded)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


def test_health_check_sends_the_credentials_as_mlflows_client_does(
    guarded_health: tuple[int, list[str]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The URI's userinfo (decoded) as Basic auth, not as a host name; else MLFLOW_TRACKING_USERNAME/PASSWORD; the
    URI's over the variables, as MLflow's client (through requests) sends them: asked of the same server."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    port, seen = guarded_health
    uri, plain = uri_with_credentials(port), f"http://127.0.0.1:{port}"
    for tracking, env in ((uri, {}), (plain, {"MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": "b0b"}),
                          (uri, {"MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": "b0b"})):
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
        monkeypatch.setattr(store, "_answered", set())
        seen.clear()
        assert store.preflight() == tracking
        with pytest.raises(MlflowException):  # the guarded server has no API: only what the client sent matters
            MlflowClient(tracking).get_experiment("0")
        (health, api) = seen
        assert health == f"/health {api.split(' ', 1)[1]}", seen
        assert health.endswith(f"{USER}:{PASSWORD}" if tracking == uri else "bob:b0b"), seen

    assert store.login_tag(uri) == {"mlflow.user": USER} and store.login_tag(plain) == {}  # whose runs they are

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", plain)
    monkeypatch.setattr(store, "_answered", set())
    with pytest.raises(store.PermissionRefused, match="answered HTTP 401 when checking /health: a permission problem"):
        store.preflight()  # refused is no outage: no waiting, no "not reachable"


def test_spool_files_hold_the_store_redacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """meta.json of a spooled run, and of a note of a run's end, name the store without its userinfo."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri_with_credentials(9))
    reason = store.failure_reason(f"API request to {uri_with_credentials(9)}/api/2.0/mlflow/runs/create failed")
    _, _, _, folder = spool.open_spool("e", "train@mlp", {"stage": "train@mlp"}, 0, None, reason)
    ended = spool.spool_run_end("e", "train@mlp", "0123", "FAILED", reason)
    assert ended is not None
    for meta in (folder / "meta.json", ended / "meta.json"):
        assert json.loads(meta.read_text())["store"] == "http://***@127.0.0.1:9"
    spooled = b"".join(p.read_bytes() for p in (tmp_path / spool.SPOOL_DIR).rglob("*") if p.is_file())
    assert PASSWORD.encode() not in spooled and quote(PASSWORD, safe="").encode() not in spooled


@pytest.mark.slow
def test_a_server_that_is_down_is_named_without_its_password_by_every_command(baseline: Path, tmp_path: Path) -> None:
    """Every stage (by hand and under `dvc repro`), sync, compare and serve: one line, `http://***@…`, no password.
    By hand in a reproduced copy (each stage's inputs are there and verified: the store is what stops it)."""
    project = clone(baseline, tmp_path / "reproduced")
    port = free_port()
    env = run_env(MLFLOW_TRACKING_URI=uri_with_credentials(port), PORT=str(free_port()))
    commands = {
        **{stage: ["python", "-m", "stages", *stage.split("@")] for stage in pipeline_stages()},
        "sync": SYNC, "compare": ["python", "-m", "pipeline.compare"], "serve": ["python", "-m", "pipeline.serve"],
    }
    for name, cmd in commands.items():
        proc = sh(project, *cmd, check=False, env=env)
        assert proc.returncode == 1 and proc.stdout == "", (name, proc.stdout, proc.stderr)
        (line,) = proc.stderr.splitlines()
        assert line.startswith(f"{name}: ") and f"http://***@127.0.0.1:{port} is not reachable (" in line, line
        assert PASSWORD not in line and quote(PASSWORD, safe="") not in line and quote(USER, safe="") not in line, line
    fresh = copy_project(tmp_path / "fresh")  # nothing reproduced: generate runs first, and stops at the store
    repro = dvc(fresh, "repro", check=False, env=env)
    output = repro.stdout + repro.stderr
    assert repro.returncode != 0 and f"generate: MLflow tracking server at http://***@127.0.0.1:{port} is not " \
        "reachable ([Errno 111] Connection refused)" in output, output
    assert quote(PASSWORD, safe="") not in output and PASSWORD not in output
    assert not (project / spool.SPOOL_DIR).exists() and not (fresh / spool.SPOOL_DIR).exists()


def test_a_server_failing_while_runs_are_read_is_one_line_without_the_password(
    guarded_health: tuple[int, list[str]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """compare's reads: a server whose /health answers but whose API fails is one line (not MLflow's traceback, which
    names the URL as given)."""
    from pipeline.tracking import reading

    port, _ = guarded_health
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri_with_credentials(port))
    monkeypatch.setattr(store, "_answered", set())
    for read in (lambda: reading.stage_runs("regression"), lambda: reading.running_after_cleanup("regression", "compare")):
        with pytest.raises(store.TrackingError) as failed:
            read()
        line = str(failed.value)
        assert line.startswith(f"MLflow store at http://***@127.0.0.1:{port} failed while reading runs ("), line
        assert PASSWORD not in line and quote(PASSWORD, safe="") not in line and "\n" not in line, line
