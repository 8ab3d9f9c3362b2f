"""Small file helpers: atomic writes, rounded metrics and content digests.

A stage writes every output through `atomic_path`, so a failed or killed stage
leaves either the old file or none, never a half-written one for DVC to cache.
Files get the mode a plain `open()` would give (0644 under the usual umask 022),
like the files DVC itself writes, so teammates on a shared machine can read them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import numbers
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def write_json(path: str | Path, payload: Any) -> None:
    """Write JSON atomically, keys sorted so equal content gives equal bytes."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


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


def write_text(path: str | Path, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV (a DVC plot) atomically: the header, then one line per row."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
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
