"""The error every stage turns into one readable line instead of a traceback.

Kept import-free so a stage can catch it before torch or mlflow are loaded.
"""


class PipelineError(Exception):
    """A problem the user can fix; the message says what is wrong and what is allowed."""
