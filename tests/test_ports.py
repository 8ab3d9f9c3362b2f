"""The long-running commands' ports: own defaults, one line and exit 2 when taken, the URL once ready."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import ports
from tests.helpers import ROOT, run_env

# Every way a user starts a server; the name is the command the error line starts with.
ENTRY_POINTS = {
    "tasks.sh ui": ("ui", ["./tasks.sh", "ui"]),
    "tasks.sh server": ("server", ["./tasks.sh", "server"]),
    "tasks.sh serve": ("serve", ["./tasks.sh", "serve"]),
    "mlflow-server.sh": ("server", ["scripts/mlflow-server.sh"]),
    "pipeline.serve": ("serve", [sys.executable, "-m", "pipeline.serve"]),
}


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port some other program is listening on (127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def test_each_command_has_its_own_default_port() -> None:
    defaults = {name: ports.port_for(name, {}) for name in ports.COMMANDS}
    assert defaults == {"ui": 5000, "server": 5001, "serve": 5002}
    assert ports.port_for("serve", {"PORT": "6123"}) == 6123
    with pytest.raises(ports.PortError, match=r"^ui: PORT must be a TCP port number \(1-65535\), got '70000'$"):
        ports.port_for("ui", {"PORT": "70000"})


@pytest.mark.bad_input
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_taken_port_is_one_line_and_exit_2_before_anything_starts(entry: str, taken_port: int, tmp_path: Path) -> None:
    name, cmd = ENTRY_POINTS[entry]
    server_dir = tmp_path / "server"
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(PORT=str(taken_port), SERVER_DIR=str(server_dir)),
                          capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.fullmatch(rf"{name}: port {taken_port} on 127\.0\.0\.1 is already in use; "
                        r"choose another with the PORT variable \(PORT=\d+ is free\)", lines[0]), lines[0]
    free = int(re.search(r"PORT=(\d+)", lines[0])[1])
    with socket.socket() as sock:  # the suggestion is right
        sock.bind(("127.0.0.1", free))
    assert not server_dir.exists()  # the tracking server made nothing
    assert elapsed < 2.0, f"{entry} took {elapsed:.2f} s to refuse a taken port"  # the bound


@pytest.mark.bad_input
def test_bad_port_value_is_one_line() -> None:
    proc = subprocess.run(["./tasks.sh", "ui"], cwd=ROOT, env=run_env(PORT="http"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["ui: PORT must be a TCP port number (1-65535), got 'http'"]


def _wait_for_line(log: Path, pattern: str, seconds: float = 30) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if found := re.search(pattern, log.read_text(errors="replace"), re.MULTILINE):
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no line matching {pattern!r} in:\n{log.read_text(errors='replace')}")


@pytest.mark.slow
def test_tracking_server_prints_its_url_when_ready(start_server: Any, tmp_path: Path) -> None:
    server = start_server()  # scripts/mlflow-server.sh on a free port; returns once /health answers
    line = _wait_for_line(tmp_path / "server0.log", r"^server: .*$")
    assert line == f"server: MLflow tracking server ready at {server.url} (clients: MLFLOW_TRACKING_URI=<this URL>)"


def test_announce_stays_quiet_when_the_server_dies(tmp_path: Path) -> None:
    """The ready line needs an answer: a server that exits first leaves no line and no waiting process."""
    log = tmp_path / "announce.log"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: nothing answers
    with open(log, "w") as out:
        victim = subprocess.Popen(["sleep", "30"])
        subprocess.run([sys.executable, "-m", "pipeline.ports", "announce", "ui", "--port", str(port),
                        "--pid", str(victim.pid)], cwd=ROOT, env=run_env(), stdout=out, check=True, timeout=30)
    victim.kill()
    victim.wait()
    time.sleep(1.0)  # the announcer polls every 0.25 s
    assert log.read_text() == ""
    probe = subprocess.run(["pgrep", "-f", f"pipeline.ports announce ui --port {port}"], capture_output=True, text=True)
    assert probe.stdout == "", "the announcer outlived the process it watched"


def test_announce_prints_the_url_once_something_answers(tmp_path: Path) -> None:
    """Any HTTP answer counts as ready (an auth server says 401): here a plain file server's 404."""
    log = tmp_path / "announce.log"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    web = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with open(log, "w") as out:
            subprocess.run([sys.executable, "-m", "pipeline.ports", "announce", "serve", "--port", str(port),
                            "--pid", str(web.pid)], cwd=ROOT, env=run_env(), stdout=out, check=True, timeout=30)
        line = _wait_for_line(log, r"^serve: .*$")
    finally:
        web.kill()
        web.wait()
    assert line == f"serve: model server ready at http://127.0.0.1:{port} (POST rows to /invocations)"
