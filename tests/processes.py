"""Background processes for tests: free ports, whole process groups stopped, a logged model served over REST."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.workspace import free_port


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is left."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM a process started with start_new_session=True and its whole group; SIGKILL what lingers."""
    pgid = proc.pid  # the session leader's pid is the group id
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not group_alive(pgid):
            break
        os.killpg(pgid, sig)
        for _ in range(600):
            proc.poll()  # reap the leader, or it stays in the group as a zombie
            if not group_alive(pgid):
                break
            time.sleep(0.1)


def wait_for_http(proc: subprocess.Popen[Any], url: str, log: Path, tries: int = 1200) -> None:
    """Poll `url` (every 0.1 s, `tries` times) until it answers HTTP 200; fail with the log if `proc` exits first."""
    for _ in range(tries):
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} never answered:\n{log.read_text()}")


@contextmanager
def served_model(model_uri: str, cwd: Path, env: dict[str, str], log: Path) -> Iterator[str]:
    """`mlflow models serve --env-manager local` on a free 127.0.0.1 port; yields its URL, stops its group after."""
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(proc, f"{url}/ping", log, tries=1800)  # up to three minutes on a busy machine
        yield url
    finally:
        stop_group(proc)
        assert not group_alive(proc.pid), f"processes of group {proc.pid} outlived the model server"


def predict_rest(url: str, rows: list[list[float]]) -> list[float]:
    """POST rows to a model server's /invocations; its predictions, one per row."""
    body = json.dumps({"inputs": rows}).encode()
    request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        answer = json.loads(resp.read())["predictions"]
    return [float(p[0]) if isinstance(p, list) else float(p) for p in answer]
