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


def post(url: str, body: bytes, content_type: str) -> tuple[int, str]:
    """POST a raw body to a model server's /invocations; the HTTP status and the body, errors included."""
    request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def bad_requests(n_features: int) -> dict[str, tuple[bytes, str, str]]:
    """Requests a model server must refuse: name -> (body, content type, what its one-line answer contains)."""
    good = [0.5] * n_features

    def rows(*bad: tuple[int, object]) -> bytes:  # two good rows with a value replaced: (column, value) per row
        table = [good.copy(), good.copy()]
        for r, (column, value) in enumerate(bad):
            table[r][column] = value
        return json.dumps({"inputs": table}).encode()  # NaN and Infinity as Python's json writes them

    row = json.dumps(good)
    header = ",".join(f"x{i}" for i in range(n_features))
    csv_row = ",".join(map(str, good))
    json_cases = {
        "null": (rows((0, 0.5), (1, None)), "row 1, column 1: the value is missing"),
        "NaN": (rows((0, float("nan"))), "row 0, column 0: the value is missing"),
        "inf": (rows((0, 0.5), (2, float("inf"))), "row 1, column 2: the value is infinite"),
        "beyond float32": (rows((3, 1e300)), "row 0, column 3"),
        "too few features": (json.dumps({"inputs": [good[1:]]}).encode(), f"has {n_features - 1} values, the model takes {n_features}"),
        "too many features": (json.dumps({"inputs": [good + [0.5]]}).encode(), f"has {n_features + 1} values"),
        "ragged rows": (json.dumps({"inputs": [good, good[1:]]}).encode(), "Invalid input"),
        "a string": (rows((0, "abc")), "could not convert string to float"),
        "malformed JSON": (b'{"inputs": [[0.5, ', "valid JSON"),
        "empty body": (b"", "valid JSON"),
        "empty rows": (b'{"inputs": []}', ""),
        "no inputs key": (b'{"rows": [[0.5]]}', "exactly one of the input fields"),
        "a JSON list": (f"[{row}]".encode(), "Received a list"),
        "malformed 20 MB": (('{"inputs": [' + f"{row}," * (20_000_000 // (len(row) + 1)) + "[").encode(), "valid JSON"),
    }
    csv_cases = {
        "CSV missing value": (f"{header}\n{csv_row[:csv_row.rindex(',')]},\n", f"row 0, column {n_features - 1}: the value is missing"),
        "CSV string": (f"{header}\nabc{csv_row[csv_row.index(','):]}\n", "could not convert"),
        "CSV too few columns": (f"{header[:header.rindex(',')]}\n{csv_row[:csv_row.rindex(',')]}\n", f"has {n_features - 1} values"),
        "CSV empty": ("", "No columns to parse"),
        "CSV malformed": (f'{header}\n{csv_row},1,2,3\n"', "Failed to parse"),
    }
    return {name: (body, "application/json", expect) for name, (body, expect) in json_cases.items()} | {
        name: (body.encode(), "text/csv", expect) for name, (body, expect) in csv_cases.items()
    }
