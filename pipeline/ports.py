"""The ports of the long-running commands, checked in one place: `./tasks.sh ui`, `server`, `serve`.

Each command has its own default port, so the UI, a tracking server and a model
server run side by side. Before anything starts, `check` binds the port once: a
taken port is one line naming the port and PORT (the variable that picks
another), exit 2, in well under a second instead of a server dying 14 s later in
its own log. `announce` prints the URL once the server answers. Standard library
only: tasks.sh calls it with the system Python, before the project is installed.

    python -m pipeline.ports check ui [--host 127.0.0.1]   # prints the port, or one line on stderr and exit 2
    python -m pipeline.ports announce ui --port 5000 --pid $$   # detaches; prints the URL when it answers
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

from pipeline.processes import pid_exists

# command -> (default port, what it serves, the path that answers once it is ready, a hint after the URL)
COMMANDS: dict[str, tuple[int, str, str, str]] = {
    "ui": (5000, "MLflow UI", "/health", ""),
    "server": (5001, "MLflow tracking server", "/health", " (clients: MLFLOW_TRACKING_URI=<this URL>)"),
    "serve": (5002, "model server", "/ping", " (POST rows to /invocations)"),
}
PORT_VAR = "PORT"
WAIT_S = 900.0  # announce gives up after this long (a server that never answered has said why in its log)


class PortError(Exception):
    """A bad or taken port; the message is the one line the user sees."""


def port_for(command: str, environ: Mapping[str, str] = os.environ) -> int:
    """The port `command` listens on: PORT when set, else the command's own default."""
    text = environ.get(PORT_VAR, "").strip()
    if not text:
        return COMMANDS[command][0]
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise PortError(f"{command}: {PORT_VAR} must be a TCP port number (1-65535), got {text!r}")
    return int(text)


def _bind(host: str, port: int) -> None:
    """Bind (and close) a listening socket as the servers do (SO_REUSEADDR); raises OSError when taken."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1)


def _free_after(host: str, port: int) -> int | None:
    """The first free port above `port` that is no command's default (a suggestion for the error line)."""
    defaults = {default for default, *_ in COMMANDS.values()}
    for candidate in range(port + 1, min(port + 50, 65536)):
        if candidate in defaults:
            continue
        try:
            _bind(host, candidate)
        except OSError:
            continue
        return candidate
    return None


def check(command: str, host: str = "127.0.0.1", environ: Mapping[str, str] = os.environ) -> int:
    """The port for `command` if it can be bound on `host`; else PortError naming the port and PORT."""
    port = port_for(command, environ)
    try:
        _bind(host, port)
    except OSError as exc:
        reason = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
        hint = f" ({PORT_VAR}={free} is free)" if (free := _free_after(host, port)) else ""
        raise PortError(f"{command}: port {port} on {host} {reason}; choose another with the {PORT_VAR} variable{hint}") from None
    return port


WILDCARDS = ("0.0.0.0", "::", "")


def url(host: str, port: int) -> str:
    """The address to print: a wildcard host is shown as this machine's name."""
    return f"http://{socket.gethostname() if host in WILDCARDS else host}:{port}"


def _answers(probe: str) -> bool:
    """Whether an HTTP server answers `probe` (any status counts: an auth server says 401 when ready)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(probe, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def announce(command: str, host: str, port: int, pid: int, wait_s: float = WAIT_S) -> None:
    """Detach, then print '<command>: <what> ready at <URL>' once it answers; quiet if `pid` dies first.

    Forks so the caller (a shell about to `exec` the server, or pipeline.serve) goes on at once
    and never has to reap it; the child stays in the server's process group, so stopping the
    group stops it too.
    """
    if os.fork():
        return
    _, what, path, hint = COMMANDS[command]
    probe = f"http://{'127.0.0.1' if host in WILDCARDS else host}:{port}{path}"
    deadline = time.monotonic() + wait_s
    try:
        while time.monotonic() < deadline and pid_exists(pid):
            if _answers(probe):
                print(f"{command}: {what} ready at {url(host, port)}{hint}", flush=True)
                break
            time.sleep(0.25)
    finally:
        os._exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """`check` prints the port (exit 0) or one line on stderr (exit 2); `announce` returns at once."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.ports", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    check_p = sub.add_parser("check", help="print the command's port if it is free, else one line and exit 2")
    check_p.add_argument("command", choices=COMMANDS)
    check_p.add_argument("--host", default="127.0.0.1")
    announce_p = sub.add_parser("announce", help="detach; print the URL once the server answers")
    announce_p.add_argument("command", choices=COMMANDS)
    announce_p.add_argument("--host", default="127.0.0.1")
    announce_p.add_argument("--port", type=int, required=True)
    announce_p.add_argument("--pid", type=int, required=True, help="the server's process: stop waiting when it is gone")
    args = parser.parse_args(argv)
    if args.action == "announce":
        announce(args.command, args.host, args.port, args.pid)
        return 0
    try:
        print(check(args.command, args.host))
    except PortError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
