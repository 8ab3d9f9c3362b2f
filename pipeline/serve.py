"""Serve a model's registered champion over HTTP: `python -m pipeline.serve [model]` (`./tasks.sh serve`).

Serves `models:/regression-<model>@champion` from the store every stage uses
(MLFLOW_TRACKING_URI, else the workspace's mlflow.db) with MLflow's own scoring app,
what `mlflow models serve --env-manager local` runs, behind limits on a request's
size and JSON nesting (pipeline/tracking/serving.py: 413 or 400, one line), on
127.0.0.1 and the port in PORT (default 5002, so it runs beside `./tasks.sh ui` on
5000). A bad model name, a bad or taken port, or a missing champion is one line on
stderr before MLflow starts; the URL is printed once the server answers.

    curl -s http://127.0.0.1:5002/invocations -H 'Content-Type: application/json' \\
         -d '{"inputs": [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]]}'
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from pipeline import config, ports, zoo
from pipeline.errors import PipelineError


def command(model: str, port: str) -> tuple[list[str], str]:
    """The model server's command line for `model`'s champion, and a line saying what it serves.

    Raises PipelineError on bad input.
    """
    known = zoo.available()  # not params.yaml: a teammate serves the champion from any folder
    if model not in known:
        raise PipelineError(f"unknown model {model!r}; allowed: {', '.join(known)} (the modules in pipeline/zoo/)")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise PipelineError(f"PORT must be a TCP port number (1-65535), got {port!r}")
    from pipeline import tracking

    uri, version = tracking.champion(model)
    cmd = [sys.executable, "-m", "pipeline.tracking.serving", uri, "--host", "127.0.0.1", "--port", port]
    name = tracking.registered_name(model)
    return cmd, f"serve: {name} version {version} (alias @{tracking.CHAMPION}) from {tracking.redact(tracking.tracking_uri())}"


def main(argv: Sequence[str] | None = None) -> int:
    """Check the arguments and the champion, then replace this process with the model server."""
    args = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: python -m pipeline.serve [model]  (a model of pipeline/zoo/, default the last of params.yaml's "
             f"models; port from {ports.PORT_VAR}, default {ports.COMMANDS['serve'][0]})")
    if args[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if len(args) > 1:
        print(usage, file=sys.stderr)
        return 2
    try:
        port = ports.check("serve")  # before the registry is read: a taken port fails in a fraction of a second
    except ports.PortError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        cmd, serving = command(args[0] if args else config.load().models[-1], str(port))
        from pipeline import tracking

        os.environ["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()
    except PipelineError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 1
    print(serving, file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "pipeline.ports", "announce", "serve", "--port", str(port),
                    "--pid", str(os.getpid())], check=False)  # detaches; prints the URL once the server answers
    return os.execv(cmd[0], cmd)  # replaces this process: returns only by raising OSError


if __name__ == "__main__":
    sys.exit(main())
