"""Small file helpers: atomic writes, rounded metrics and content digests.

A stage writes its outputs through `publish`: each into a temp file beside its target, all
renamed into place together or none, so a failed or killed stage leaves the old files or
none, never a half-written one for DVC to cache, and a full or read-only disk is one line
naming the file. The writers here (and models.save_weights, plots, data.generate) write
straight into the path they are given, the temp publish handed out: one temp file per output.
`atomic_path` is for a file written on its own (a checkpoint).
Files get the mode a plain `open()` would give (0644 under the usual umask 022),
like the files DVC itself writes, so teammates on a shared machine can read them.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import math
import numbers
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError, first_line

# Metrics files keep this many significant digits. Float noise between CPUs (a
# different BLAS kernel in least squares, another summation order in a mean) moves
# values by about 1e-15 relative in float64 and 1e-7 in float32: far below the last
# kept digit (1e-5 relative), so machines that compute the same data and weights
# write the same bytes. Five digits still separate every model (README's table shows four).
SIG_DIGITS = 5


def _file_mode() -> int:
    """0666 minus the process umask: the mode open() and DVC give new files."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _file_mode())  # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class PublishError(PipelineError):
    """An output could not be written (no space, read-only, permission, quota); none of the set was published."""


_ADVICE = {
    errno.ENOSPC: "free some space on that disk",
    errno.EDQUOT: "free some space within your quota",
    errno.EROFS: "the file system is mounted read-only; write the outputs elsewhere or remount it",
    errno.EACCES: "check the folder's owner and permissions",
    errno.EPERM: "check the folder's owner and permissions",
}


def _errno(exc: OSError) -> int | None:
    """The error number, also from libraries (pyarrow) that only put '[Errno 28]' in the message."""
    if exc.errno is not None:
        return exc.errno
    found = re.search(r"\[errno (\d+)\]", str(exc), re.IGNORECASE)
    return int(found.group(1)) if found else None


def os_error_cause(exc: OSError) -> str:
    """The cause of an OSError in words with its errno name: 'no space left on device (ENOSPC)'."""
    number = _errno(exc)
    if number is not None:
        return f"{os.strerror(number).lower()} ({errno.errorcode.get(number, number)})"
    return first_line(exc, type(exc).__name__)[:200]


def describe_os_error(path: str | Path, exc: OSError, outcome: str = "nothing was published") -> str:
    """One line: the file, the cause in words with its errno name, what was published, and what to do."""
    advice = _ADVICE.get(_errno(exc) or -1, "fix the cause")
    return f"{path}: {os_error_cause(exc)}; {outcome}, {advice} and run the stage again"


class Outputs:
    """The outputs of one `publish` block: each is written to a temp file beside its target."""

    def __init__(self) -> None:
        self._temps: dict[Path, Path] = {}  # target -> temp
        self.current: Path | None = None  # the target last handed out: the one being written

    def path(self, target: str | Path) -> Path:
        """A temp path next to `target` for writers that take a path (parquet, safetensors, savefig with format=)."""
        target = Path(target)
        self.current = target
        if target in self._temps:
            return self._temps[target]
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        self._temps[target] = Path(tmp)
        return Path(tmp)

    def target_of(self, exc: OSError) -> Path | None:
        """The output an OSError was about: its temp file's target if the error names one, else the current."""
        named = {str(tmp): target for target, tmp in self._temps.items()}
        for name in (exc.filename, exc.filename2):
            if name is not None and str(name) in named:
                return named[str(name)]
        return self.current

    def commit(self) -> None:
        """Rename every temp onto its target: renames in the same folder take no new space."""
        mode = _file_mode()
        for target, tmp in self._temps.items():
            os.chmod(tmp, mode)  # mkstemp makes 0600
        done: list[str] = []
        for target, tmp in self._temps.items():
            try:
                os.replace(tmp, target)
            except OSError as exc:
                outcome = f"already published: {', '.join(done)}" if done else "nothing was published"
                raise PublishError(describe_os_error(target, exc, outcome)) from None
            done.append(str(target))

    def discard(self) -> None:
        """Remove the temps not renamed (all of them when the block failed)."""
        for tmp in self._temps.values():
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass


@contextmanager
def publish() -> Iterator[Outputs]:
    """Write a stage's outputs together: all appear when the block succeeds, none when anything fails.

    Each output goes to a temp file next to its target; only when the block has
    written all of them are they renamed into place. Any OSError (no space,
    read-only file system, permission, quota) removes the temps and becomes a
    PublishError whose one line names the file and the cause; other exceptions
    also remove the temps and pass through unchanged.
    """
    out = Outputs()
    try:
        yield out
        out.commit()
    except OSError as exc:
        raise PublishError(describe_os_error(out.target_of(exc) or "(outputs)", exc)) from None
    finally:
        out.discard()


def write_json(path: str | Path, payload: Any) -> None:
    """Write JSON to `path` (a publish temp), keys sorted so equal content gives equal bytes."""
    Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def round_sig(payload: Any, digits: int = SIG_DIGITS) -> Any:
    """Real numbers (also inside dicts and lists; numpy's too) as floats rounded to `digits` significant digits.

    Significant digits, never decimals: a tiny value (a gradient check's 2.4e-07) keeps its
    digits instead of becoming 0.0. Integers, non-finite floats and the rest stay as they are.
    """
    if isinstance(payload, dict):
        return {k: round_sig(v, digits) for k, v in payload.items()}
    if isinstance(payload, list | tuple):
        return [round_sig(v, digits) for v in payload]
    if isinstance(payload, numbers.Real) and not isinstance(payload, numbers.Integral) and math.isfinite(payload):
        return float(f"{float(payload):.{digits}g}")
    return payload


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """Write a DVC metrics file: floats rounded to SIG_DIGITS so every machine writes the same bytes."""
    write_json(path, round_sig(metrics))


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV (a DVC plot) to `path` (a publish temp): the header, then one line per row."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def md5_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Content hash as DVC computes it (so it matches dvc.lock), streamed for big files."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
