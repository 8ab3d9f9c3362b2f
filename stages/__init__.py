"""The DVC stage entry points (`python -m stages.<name>`).

A stage started outside the project's environment (a Python without torch, mlflow, ...)
ends with one line saying how to get it, instead of a ModuleNotFoundError traceback.
"""

from __future__ import annotations

import sys
from types import TracebackType


def _missing_environment(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, ModuleNotFoundError):
        print(
            f"{exc} (Python: {sys.executable}): this is not the project's environment; "
            "run `./tasks.sh repro` (installs .venv, then runs the pipeline), or `source .venv/bin/activate` first",
            file=sys.stderr,
        )
        return
    sys.__excepthook__(kind, exc, tb)


sys.excepthook = _missing_environment
