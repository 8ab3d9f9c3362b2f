"""The DVC stages, one module each, all started through one entry point: `python -m stages <stage> [model]`.

A stage started outside the project's environment (a Python without torch, mlflow, ...)
ends with one line saying how to get it, instead of a ModuleNotFoundError traceback.
`python -m stages.<module>` would import the module and exit 0 having done nothing: it fails
with the usage line instead (exit 2), before the module loads.
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


def _refuse_module_run() -> None:
    """Exit 2 with the usage line when Python was started as `python -m stages.<module>` (not an entry point)."""
    argv = sys.orig_argv
    target = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else ""
    if target.startswith("stages.") and target != "stages.__main__":
        from stages.__main__ import USAGE

        print(f"{USAGE} (`python -m {target}` runs nothing)", file=sys.stderr)
        sys.exit(2)


sys.excepthook = _missing_environment
_refuse_module_run()
