"""Processes: whether one still runs (asked by pid), and running a command that leaves processes behind."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path


def pid_exists(pid: int) -> bool:
    """Whether process `pid` exists (a process of another user counts: the kernel refuses the probe, not the pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it runs, as another user
    return True


def run_leaving_children(cmd: Sequence[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `cmd` to its own end, not its children's: (exit status, its output, stdout and stderr together).

    `dvc queue start` starts workers that inherit its output streams and outlive it. Captured through pipes, the
    call would last until the last worker quits, and now and then a DVC worker never notices that its queue is
    empty: so the output goes to a file.
    """
    with tempfile.TemporaryFile("w+") as out:
        code = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True).returncode
        out.seek(0)
        return code, out.read()
