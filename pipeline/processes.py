"""Processes the pipeline watches: whether one still runs, asked by pid (one answer for the servers' ready line
and for orphaned runs), and the output of a command whose daemons hold it (DVC's queue workers)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable


def pid_exists(pid: int) -> bool:
    """Whether process `pid` exists (a process of another user counts: the kernel refuses the probe, not the pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it runs, as another user
    return True


def output_of_detaching(proc: subprocess.Popen[str], busy: Callable[[], bool], stop: Callable[[], object],
                        poll_s: float, grace_s: float) -> tuple[str, str]:
    """The (stdout, stderr) of `proc`, a command whose daemons inherit its output streams (`dvc queue start` and
    its queue workers), once the last of them has quit; never later than `2 * grace_s` after `busy()` says no.

    The workers quit seconds after their queue is empty, and the output ends with them. Now and then one never
    notices (seen in a clean-clone CI run: three of four quit 1-15 s after the last experiment, the fourth only
    at `dvc queue stop`, 600 s later): `grace_s` after `busy()` first said no, `stop()` tells them to stop; a
    worker that outlives another `grace_s` is left with its output unread, ("", ""), and `proc` is killed if it
    still runs itself.
    """
    idle_since = stopped_at = None
    while True:
        try:
            out, err = proc.communicate(timeout=poll_s)
            return out or "", err or ""
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if busy():
            idle_since = stopped_at = None
        elif idle_since is None:
            idle_since = now
        elif stopped_at is None and now - idle_since > grace_s:
            stop()
            stopped_at = time.monotonic()
        elif stopped_at is not None and now - stopped_at > grace_s:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()
            return "", ""
