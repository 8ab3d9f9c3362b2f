"""Whether a process still runs, asked by pid: one answer for the servers' ready line and for orphaned runs."""

from __future__ import annotations

import os


def pid_exists(pid: int) -> bool:
    """Whether process `pid` exists (a process of another user counts: the kernel refuses the probe, not the pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it runs, as another user
    return True

