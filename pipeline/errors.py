"""The error every stage turns into one readable line instead of a traceback.

Kept import-free so a stage can catch it before torch or mlflow are loaded.
"""


class PipelineError(Exception):
    """A problem the user can fix; the message says what is wrong and what is allowed."""


def interrupted(exc: BaseException) -> str:
    """'interrupted (Ctrl-C)', or with the interrupt's own words: the stage's last line and its run's reason say the same."""
    return f"interrupted ({str(exc) or 'Ctrl-C'})"
