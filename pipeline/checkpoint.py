"""Checkpoints of a training loop: save its whole state, load it back exactly, never a wrong one.

A checkpoint is ONE safetensors file: the tensors (weights, optimizer moments, RNG states,
best weights) as tensors, everything else (epoch, histories, scheduler state, the MLflow
run id) as JSON in the file's header. No pickle. One file, written through
`files.atomic_path`, so a checkpoint is either the old one or the new one, never half of each.

The header also holds a format version, a `key`: a digest of what the result depends on
(the stage's params, its dependency files: code and data), and a `digest` over the whole content
(key, JSON state and every tensor), so a changed epoch count or history is caught like a changed
weight. `load` returns None, with one line saying why, for a file that is missing, damaged, from
another version of the project, or keyed to other params, data or code: the caller then trains
from scratch.

`Checkpoints` is what a loop calls once per epoch (or per logged step): it saves every
`every` epochs (no sooner than `min_seconds` after the last save), and, inside `deferring_interrupts()`, turns SIGINT/SIGTERM into "save at the
end of this epoch, then stop" so an interruption costs at most the epoch in progress.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pipeline.errors import first_line
from pipeline.files import atomic_path, md5_file

FORMAT = 2  # bump when the saved state changes shape: older files are then refused, not misread
FOLDER = Path(".checkpoints")  # at the workspace root; ignored by git and DVC


def path_for(stage: str, folder: Path = FOLDER) -> Path:
    """The one checkpoint file of a stage (`train@mlp` -> .checkpoints/train@mlp.safetensors)."""
    return folder / f"{stage}.safetensors"


def key(params: dict[str, Any], files: list[str | Path]) -> str:
    """Digest of the params and the contents of `files` (code and data): what makes a checkpoint usable.

    A file that is missing counts as such (the stage then fails on it with its own one-line error).
    """
    payload = {"params": params, "files": {str(f): md5_file(f) if Path(f).is_file() else None for f in files}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------- nested state <-> (tensors, JSON)


def _split(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of `value` where every tensor is replaced by {"tensor": name} and put in `tensors`."""
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {"tensor": name}
    if isinstance(value, dict):  # optimizer state has int keys: keep them as pairs
        return {"items": [[k, _split(v, f"{name}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):  # e.g. Adam's betas
        return {"tuple": [_split(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_split(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"{name}: cannot checkpoint a {type(value).__name__} without pickle")


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `_split`."""
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    if isinstance(value, dict):
        if "tensor" in value:
            return tensors[value["tensor"]]
        if "tuple" in value:
            return tuple(_join(v, tensors) for v in value["tuple"])
        return {k: _join(v, tensors) for k, v in value["items"]}
    return value


def _digest(key: str, state: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the key, the JSON state and every tensor's name, dtype, shape and bytes.

    The whole content: a resume trusts the epoch count and histories as much as the weights, so an
    edited "done" or a flipped digit in a saved loss must be caught like damage inside a tensor.
    """
    digest = hashlib.sha256()
    digest.update(f"{len(key)}|{key}|{len(state)}|{state}|".encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save(path: Path, state: dict[str, Any], key: str) -> None:
    """Write `state` (nested dicts/lists of tensors and plain values) as one safetensors file, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _split(state, "s", tensors)
    text = json.dumps(tree)
    header = {"format": str(FORMAT), "key": key, "state": text, "digest": _digest(key, text, tensors)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def load(path: Path, key: str) -> tuple[dict[str, Any] | None, str]:
    """(the saved state, "") when `path` holds a sound checkpoint for `key`; (None, why not) otherwise."""
    if not path.exists():
        return None, ""
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            if header.get("format") != str(FORMAT):
                return None, f"{path} was written by another version of the project (format {header.get('format')}, "\
                             f"this one reads {FORMAT})"
            if header.get("key") != key:
                return None, f"{path} belongs to other params, data or code than this run's"
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 (safe_open has no iterator)
        if _digest(key, header["state"], tensors) != header.get("digest"):
            return None, f"{path} is damaged (its state or tensors do not match their digest)"
        return _join(json.loads(header["state"]), tensors), ""
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        reason = first_line(f"{type(exc).__name__}: {exc}")
        return None, f"{path} is damaged or truncated ({reason})"


def remove(path: Path) -> None:
    """Delete a stage's checkpoint (the stage finished: its outputs are what a rerun would give)."""
    with suppress(FileNotFoundError):
        path.unlink()


# ---------------------------------------------------------------- the loop's hook


@dataclass
class Checkpoints:
    """Called by a training loop at each consistent point; saves every `every` epochs/steps and on an interrupt.

    `write` False (data-parallel ranks other than 0) saves nothing but still stops on an interrupt,
    at the same point as the rank that saves. `meta` is stored beside the loop's state (the MLflow run id).
    """

    path: Path
    key: str
    every: int
    min_seconds: float = 0.0
    unit: str = "epoch"
    write: bool = True
    meta: dict[str, Any] = field(default_factory=dict)
    saved_at: int = 0
    interrupted: str = ""
    failed: str = ""
    last_save: float = field(default_factory=time.monotonic)

    def __call__(self, done: int, state: Callable[[], dict[str, Any]]) -> None:
        """`done` epochs (or steps) are complete; `state()` builds the loop state, only when a save is due.

        A periodic save is due `every` epochs, but not sooner than `min_seconds` after the last one:
        that bounds the cost on short epochs (a save takes milliseconds) and the loss on long ones.
        """
        due = (self.every > 0 and done - self.saved_at >= self.every
               and time.monotonic() - self.last_save >= self.min_seconds)
        if self.write and (due or self.interrupted) and not self.failed:
            try:
                save(self.path, {"loop": state(), "meta": self.meta}, self.key)
                self.saved_at, self.last_save = done, time.monotonic()
            except OSError as exc:  # a full disk: go on training without checkpoints, say so once
                self.failed = f"cannot write checkpoint {self.path} ({exc.strerror or exc}); training goes on without"
                print(self.failed, file=sys.stderr)
        if self.interrupted:
            kept = (f"; checkpoint after {self.unit} {done} kept in {self.path}, the next run resumes from it"
                    if self.write and not self.failed else "")
            raise KeyboardInterrupt(f"{self.interrupted}{kept}")

    @contextmanager
    def deferring_interrupts(self) -> Iterator[None]:
        """SIGINT/SIGTERM inside the block: stop at the next call (after saving); a second one stops at once."""

        def defer(signum: int, _frame: FrameType | None) -> None:
            name = "Ctrl-C" if signum == signal.SIGINT else f"stopped by signal {signal.Signals(signum).name}"
            if self.interrupted:
                raise KeyboardInterrupt(name)
            self.interrupted = name

        before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in before:
            signal.signal(s, defer)
        try:
            yield
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)
