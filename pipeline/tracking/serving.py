"""The model server `./tasks.sh serve` runs: MLflow's own scoring app, behind limits on what a request may hold.

`python -m pipeline.tracking.serving <model-uri> --host H --port P` loads the model with pyfunc and
serves MLflow's scoring app (`mlflow.pyfunc.scoring_server.init`, what `mlflow models serve` runs:
the same /invocations, /ping, /health, /version and the same answers) with uvicorn, wrapped in
`Limits`. Without them one request could take the server down or fill its log: a body of 10^6
rows took 1.84 GB, JSON nested 5,000 deep or an integer of millions of digits made Python's
parser raise, answered 500 with a traceback in the server's log. With them such a request is
answered 413 or 400 with MLflow's one-line JSON error shape, before MLflow parses anything.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY_BYTES = 16 * 1024 * 1024  # some 80,000 rows of 10 features as JSON; a bigger batch is split by the client
MAX_DEPTH = 32  # the request formats ({"inputs": [[...]]}, dataframe_split, instances) are 3 or 4 levels deep
MAX_DIGITS = 1000  # float32 needs 9 significant digits; Python's int() raises beyond 4300, MLflow then answered 500

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string, escapes included: its brackets and digits do not count
_LONG_NUMBER = re.compile(rb"\d{%d,}" % (MAX_DIGITS + 1))
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_problem(body: bytes) -> str:
    """Why a JSON body is refused before it is parsed ('' when it may be): nested too deep, or a number too long.

    A linear scan with the strings blanked out, so it costs less than the parse it protects; whether
    the body is valid JSON at all is left to MLflow's own answer.
    """
    bare = _STRING.sub(b'""', body)
    if _LONG_NUMBER.search(bare):
        return f"the request holds a number of more than {MAX_DIGITS} digits; send each value as a float"
    depth = 0
    for byte in bare.translate(None, _NOT_BRACKETS):
        depth += 1 if byte in b"[{" else -1
        if depth > MAX_DEPTH:
            return f"the request's JSON is nested more than {MAX_DEPTH} levels deep; at most {MAX_DEPTH} are accepted"
    return ""


async def _answer(send: Send, status: int, code: str, message: str) -> None:
    """A one-line JSON error in MLflow's shape ({"error_code", "message"}), closing the connection."""
    body = json.dumps({"error_code": code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close"),
    ]})
    await send({"type": "http.response.body", "body": body})


class Limits:
    """ASGI middleware: a POST body over MAX_BODY_BYTES is 413, a JSON body `json_problem` refuses is 400.

    The body is read here (at most MAX_BODY_BYTES kept; the rest of a larger one is read and dropped,
    so the client, still sending, gets the answer rather than a reset connection) and handed on unchanged.
    """

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        body, too_big, more = bytearray(), False, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            too_big = too_big or len(body) + len(chunk) > MAX_BODY_BYTES
            if not too_big:
                body += chunk
            more = message.get("more_body", False)
        if too_big:
            size = headers.get(b"content-length", b"")
            has = f"{int(size)} bytes" if size.isdigit() else f"more than {MAX_BODY_BYTES} bytes"  # chunked: unknown
            await _answer(send, 413, "REQUEST_LIMIT_EXCEEDED", f"the request body has {has}; at most "
                          f"{MAX_BODY_BYTES} bytes are accepted: send the rows in smaller batches")
            return
        if headers.get(b"content-type", b"").split(b";")[0].strip().lower() == b"application/json":
            if problem := json_problem(bytes(body)):
                await _answer(send, 400, "BAD_REQUEST", problem)
                return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()  # after the body: the disconnect, when it comes
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def main(argv: Sequence[str] | None = None) -> None:
    """Load the model, then serve it behind `Limits` until stopped (the caller checked the arguments)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_uri")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)

    import mlflow.pyfunc
    import uvicorn
    from mlflow.pyfunc import scoring_server  # before the model loads: its code finds the server (pyfunc_model.py)

    app = scoring_server.init(mlflow.pyfunc.load_model(args.model_uri))
    uvicorn.run(Limits(app), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
