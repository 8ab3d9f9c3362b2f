"""Synthetic regression data: generation, splits, Parquet I/O and the ground truth.

y = X·w_true + b_true + nonlinearity·g(X) + noise,   X ~ N(0, I),  noise ~ N(0, noise_std²)

g is chosen to have mean 0, variance 1 and zero covariance with every feature, so
the best linear model is exactly (w_true, b_true) whatever `nonlinearity` is, its
excess error is exactly nonlinearity², and the Bayes error is noise_std².
Rows are drawn in fixed-size blocks, each from its own seeded generator, so the
files are byte-identical for the same params and memory stays flat at any size.
Columns are written without dictionary encoding: random floats never repeat, and
trying to build a dictionary made writing 10x slower and the files 50% larger.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.files import md5_file

SPLITS: tuple[str, ...] = ("train", "val", "test")
BLOCK_ROWS = 1 << 18
G_FORMULA = "g(X) = ((x0**2 - 1)/sqrt(2) + x1*x2) / sqrt(2)"


class DataError(PipelineError):
    """A data file is missing, damaged, or does not match the expected schema."""


@dataclass(frozen=True)
class Truth:
    """What generated the data: enough to recompute every reference exactly."""

    w_true: list[float]
    b_true: float
    noise_std: float
    nonlinearity: float
    g: str
    seed: int
    n_features: int
    rows: dict[str, int]
    digests: dict[str, str]  # md5 of each split file as generate wrote it (dvc.lock's hash): every reader checks it

    def to_dict(self) -> dict:
        """Plain dict for truth.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> Truth:
        """Parse truth.json; ValueError names what is missing or does not add up."""
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
        missing = [f for f in cls.__dataclass_fields__ if f not in raw]
        if missing:
            raise ValueError(f"lacks {missing}")
        truth = cls(**{k: raw[k] for k in cls.__dataclass_fields__})
        d = truth.n_features
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise ValueError(f"n_features is {d!r}; expected a positive integer")
        if not isinstance(truth.w_true, list) or len(truth.w_true) != d:
            count = len(truth.w_true) if isinstance(truth.w_true, list) else truth.w_true
            raise ValueError(f"w_true has {count!r} entries but n_features is {d}")
        rows = truth.rows
        if not isinstance(rows, dict) or sorted(rows) != sorted(SPLITS) or not all(
            isinstance(n, int) and n >= 1 for n in rows.values()
        ):
            raise ValueError(f"rows is {rows!r}; expected a positive row count for each of {', '.join(SPLITS)}")
        digests = truth.digests
        if not isinstance(digests, dict) or sorted(digests) != sorted(SPLITS) or not all(
            isinstance(h, str) and re.fullmatch(r"[0-9a-f]{32}", h) for h in digests.values()
        ):
            raise ValueError(f"digests is {digests!r}; expected the md5 (32 hex digits) of each of {', '.join(SPLITS)}")
        return truth


def g(X: np.ndarray) -> np.ndarray:
    """The nonlinear part: zero mean, unit variance, uncorrelated with every feature."""
    return ((X[:, 0] ** 2 - 1.0) / math.sqrt(2.0) + X[:, 1] * X[:, 2]) / math.sqrt(2.0)


def true_linear(seed: int, n_features: int) -> tuple[np.ndarray, float]:
    """The true weights and bias, drawn from the seed alone."""
    rng = np.random.default_rng([seed, 0])
    w = rng.standard_normal(n_features)
    b = float(rng.standard_normal())
    return w, b


def draw_block(
    seed: int, split: int, block: int, rows: int, w: np.ndarray, b: float,
    noise_std: float, nonlinearity: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One block of (X, y) as float32, from its own generator so blocks are independent."""
    rng = np.random.default_rng([seed, 1, split, block])
    X = rng.standard_normal((rows, w.shape[0]))
    y = X @ w + b + noise_std * rng.standard_normal(rows)
    if nonlinearity:
        y += nonlinearity * g(X)
    return X.astype(np.float32), y.astype(np.float32)


def schema(n_features: int) -> pa.Schema:
    """Columns x0 … x{d-1} and y, all float32."""
    return pa.schema([(f"x{i}", pa.float32()) for i in range(n_features)] + [("y", pa.float32())])


def _table(X: np.ndarray, y: np.ndarray, sch: pa.Schema) -> pa.Table:
    return pa.Table.from_arrays([pa.array(X[:, i]) for i in range(X.shape[1])] + [pa.array(y)], schema=sch)


def split_blocks(rows: int) -> Iterator[int]:
    """Block sizes that add up to `rows`."""
    for start in range(0, rows, BLOCK_ROWS):
        yield min(BLOCK_ROWS, rows - start)


def generate(
    files: Mapping[str, str | Path], *, seed: int, n_samples: int, n_features: int,
    noise_std: float, nonlinearity: float, rows: dict[str, int],
) -> Truth:
    """Write each split to its file in `files` (Parquet, block by block; publish temps in a stage); return the ground truth.

    The truth records each file's md5, so a reader can tell the bytes generate wrote from a flipped
    byte or a value rewritten by hand, which a readable file with the right shape would otherwise hide.
    """
    w, b = true_linear(seed, n_features)
    sch = schema(n_features)
    digests = {}
    for split_idx, split in enumerate(SPLITS):
        with pq.ParquetWriter(files[split], sch, compression="snappy", use_dictionary=False) as writer:
            for block, size in enumerate(split_blocks(rows[split])):
                X, y = draw_block(seed, split_idx, block, size, w, b, noise_std, nonlinearity)
                writer.write_table(_table(X, y, sch))
        digests[split] = md5_file(files[split])
    return Truth(
        w_true=w.tolist(), b_true=b, noise_std=noise_std, nonlinearity=nonlinearity,
        g=G_FORMULA, seed=seed, n_features=n_features, rows=dict(rows), digests=digests,
    )


class DataTooLarge(PipelineError):
    """The data the params ask for would not fit on the disk under data/ or in memory for training."""


@dataclass(frozen=True)
class Footprint:
    """What generate's data will take, in bytes: on disk (all splits) and in memory (to train on it)."""

    disk: int
    memory: int


PARQUET_OVERHEAD = 1.02  # snappy cannot shrink random float32; page and footer metadata add ~1% (measured: 1.004-1.01)
TRAIN_MEMORY_FACTOR = 2  # training holds every row as float32 plus about as much again (a read block, a batch copy)


def footprint(n_samples: int, n_features: int) -> Footprint:
    """Estimate the bytes generate writes and the bytes a stage needs to hold the data, from the params alone.

    Every row is n_features + 1 float32 values; the splits add up to n_samples rows. Pure
    arithmetic, so it runs before a row is drawn.
    """
    raw = n_samples * (n_features + 1) * 4
    return Footprint(disk=math.ceil(raw * PARQUET_OVERHEAD) + 64 * 1024, memory=raw * TRAIN_MEMORY_FACTOR)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _existing(folder: Path) -> Path:
    """`folder`, or its nearest existing parent (data/ may not exist before the first generate)."""
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def physical_memory() -> int | None:
    """This machine's RAM in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(n_samples: int, n_features: int, folder: str | Path) -> Footprint:
    """Refuse, in one line, data that would not fit on the disk holding `folder` or in this machine's memory.

    Called by generate before any work, so `data.n_samples: 1000000000` fails in a
    second instead of filling the disk at 100 MB/s. Files being replaced are not
    counted as free: atomic writes keep the old file until the new one is whole.
    """
    need = footprint(n_samples, n_features)
    where = _existing(Path(folder))
    free = shutil.disk_usage(where).free
    size = f"data.n_samples={n_samples} x data.n_features={n_features}"
    if need.disk > free:
        raise DataTooLarge(
            f"{size} needs about {_human(need.disk)} on disk, but {where} has {_human(free)} free; "
            "lower data.n_samples or data.n_features, or free some space"
        )
    ram = physical_memory()
    if ram is not None and need.memory > ram:
        raise DataTooLarge(
            f"{size} needs about {_human(need.memory)} of memory to train on, but this machine has {_human(ram)}; "
            "lower data.n_samples or data.n_features"
        )
    return need


def combined_digest(digests: dict[str, str]) -> str:
    """One short id for the whole dataset, from the per-file content hashes."""
    text = ",".join(f"{k}:{digests[k]}" for k in sorted(digests))
    return hashlib.md5(text.encode()).hexdigest()


def read_truth(path: str | Path) -> Truth:
    """Load truth.json, with a clear error when it is missing or malformed."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"{path}: missing; run `dvc repro generate` to create it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); rerun `dvc repro generate`") from None
    try:
        return Truth.from_dict(raw)
    except ValueError as exc:
        raise DataError(f"{path}: not a valid truth file: {exc}; rerun `dvc repro generate`") from None


def verify_digests(truth: Truth, files: Mapping[str, str | Path]) -> None:
    """Refuse, before any work, a split whose bytes are not those generate wrote (truth.json's md5 of it).

    One md5 pass over each file (0.6 GB/s here: 1.4 ms for the default data). A flipped byte or a
    value rewritten with pandas leaves a readable file of the right shape: only its digest tells.
    """
    for split, path in files.items():
        if not Path(path).exists():
            raise DataError(f"{path}: missing; run `dvc repro generate` to create it")
        found = md5_file(path)
        if found != truth.digests[split]:
            raise DataError(
                f"{path}: not the file generate wrote (md5 {found}, truth.json records {truth.digests[split]}); "
                f"restore it with `dvc checkout --force {path}` (DVC's copy) or rerun `dvc repro generate`"
            )


def check_consistent(truth: Truth, split: str, X: np.ndarray, path: str | Path) -> None:
    """Refuse data that does not match truth.json (stale or hand-edited files)."""
    expected = (truth.rows[split], truth.n_features)
    if X.shape != expected:
        raise DataError(
            f"{path}: has {X.shape[0]} rows x {X.shape[1]} features, but truth.json says "
            f"{expected[0]} x {expected[1]}; rerun `dvc repro generate`"
        )


def _schema_difference(actual: pa.Schema, expected: pa.Schema) -> str:
    """What differs between two schemas, in words: missing, unexpected, mistyped or reordered columns."""
    have, want = actual.names, expected.names
    problems = []
    if missing := [n for n in want if n not in have]:
        problems.append(f"missing column(s) {', '.join(missing)}")
    if extra := [n for n in have if n not in want]:
        problems.append(f"unexpected column(s) {', '.join(extra)}")
    if typed := [f"{n} is {actual.field(n).type}" for n in want if n in have and actual.field(n).type != expected.field(n).type]:
        problems.append(", ".join(typed))
    if not problems:
        problems.append(f"columns in the wrong order ({', '.join(have)})")
    return "; ".join(problems)


def read_split(path: str | Path, n_features: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load one split as (X float32 [n, d], y float32 [n]); clear errors on a bad file.

    Read one row group at a time straight into X and y, so the peak is the arrays
    plus one block, not a whole Arrow table beside them.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: missing; run `dvc repro generate` to create it")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    found = pf.schema_arrow
    names = found.names
    d = n_features if n_features is not None else len(names) - 1
    expected = schema(d)
    if not found.equals(expected):
        raise DataError(
            f"{path}: {_schema_difference(found, expected)}; expected columns x0..x{d - 1} and y, "
            "all float32 (rerun `dvc repro generate`)"
        )
    n = pf.metadata.num_rows
    if n == 0:
        raise DataError(f"{path}: has no rows")
    X = np.empty((n, d), dtype=np.float32)
    y = np.empty(n, dtype=np.float32)
    start = 0
    try:
        for group in range(pf.num_row_groups):
            block = pf.read_row_group(group)
            gaps = {name: block.column(name).null_count for name in names if block.column(name).null_count}
            if gaps:
                raise DataError(f"{path}: missing values in {gaps} (column: count); rerun `dvc repro generate`")
            stop = start + block.num_rows
            for i in range(d):
                X[start:stop, i] = block.column(i).to_numpy()
            y[start:stop] = block.column(d).to_numpy()
            start = stop
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    return X, y


def read_checked_split(path: str | Path, truth: Truth, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split read by `read_split` and checked against truth.json: what every consumer of the data needs."""
    X, y = read_split(path, truth.n_features)
    check_consistent(truth, split, X, path)
    return X, y
