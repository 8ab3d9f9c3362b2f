"""The CPU a training stage may use: a share of the cores among the stages that train at once, and no spinning.

Two measurements on a 2-core machine (bench/RESULTS.md, issue 27) set these rules:
- OpenMP's default wait policy spins a thread that waits for the others. Two `[128,128]` MLP
  trainings with two threads each, started together, took 236 s each instead of 4.3 s, every
  step waiting for a descheduled spinner. A short spin (GOMP_SPINCOUNT=1000), then sleep, is as fast
  as the default when alone (4.05 s against 4.25 s) and keeps two at once near one alone (5.2 s):
  every stage process starts with it (pipeline/warm.py, STAGE_ENV, set before torch loads).
- Two stages training at once (`dvc queue start -j 2`, `./tasks.sh search --jobs 2`) must not
  both use every core: each takes its share, the usable cores divided by the training stages of
  this user that run now (counted when training starts, in a folder of the warm server's private
  directory), and never more threads than it already had (OMP_NUM_THREADS, torchrun's split).
Steps too small to gain from threads run on one thread anyway (pipeline/device.py, SMALL_STEP).
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path

from pipeline import warm


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity call (macOS)
        return os.cpu_count() or 1


def _training_now(folder: Path) -> int:
    """How many processes registered in `folder` still run (entries of dead ones are removed)."""
    alive = 0
    for entry in folder.iterdir():
        try:
            os.kill(int(entry.name), 0)
        except (ValueError, ProcessLookupError):
            entry.unlink(missing_ok=True)
            continue
        except PermissionError:
            pass
        alive += 1
    return alive


def claim(most: int) -> int:
    """Count this process among the training stages until it exits; its threads: its share, at most `most`.

    The share is the usable cores divided by the stages training now, at least one. Where the
    private folder cannot be used, the stage counts itself alone.
    """
    try:
        folder = warm.private_dir() / "training"
        folder.mkdir(mode=0o700, exist_ok=True)
        me = folder / str(os.getpid())
        me.touch()
    except (OSError, warm.WarmError):
        return max(1, min(most, usable_cores()))
    atexit.register(me.unlink, missing_ok=True)
    return max(1, min(most, usable_cores() // max(1, _training_now(folder))))
