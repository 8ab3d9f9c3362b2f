"""The error every stage turns into one readable line instead of a traceback, and the helpers that make that line.

Kept import-free (the standard library aside) so a stage can catch it before torch or mlflow are loaded.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import NoReturn


class PipelineError(Exception):
    """A problem the user can fix; the message says what is wrong and what is allowed."""


def interrupted(exc: BaseException) -> str:
    """'interrupted (Ctrl-C)', or with the interrupt's own words: the stage's last line and its run's reason say the same."""
    return f"interrupted ({str(exc) or 'Ctrl-C'})"


def raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    """A signal handler (for SIGTERM) that stops the process as Ctrl-C does, so the same cleanup runs and names it."""
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def fail(who: str, exc: BaseException, status: int) -> NoReturn:
    """End the process the way every command here fails: one line `who: message` on stderr, exit `status`."""
    print(f"{who}: {exc}", file=sys.stderr)
    sys.exit(status)


def first_line(message: object, default: str = "") -> str:
    """The first line of a message (libraries' messages run to many lines, an error here is one); `default` if empty."""
    lines = str(message).strip().splitlines()
    return lines[0] if lines else default
