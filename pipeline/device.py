"""Where and how training runs: the device, seeds and deterministic kernels, CPU threads for small steps."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from pipeline.errors import PipelineError


def resolve_device(requested: str) -> torch.device:
    """'auto' → CUDA when present, else CPU; 'cuda' without CUDA is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise PipelineError("device: got 'cuda', but this machine has no CUDA device; allowed here: auto, cpu")
    return torch.device(requested)


def prepare(requested: str, seed: int, threads: int) -> torch.device:
    """The device to train on, with torch seeded, deterministic kernels on, and `threads` CPU threads at most."""
    device = resolve_device(requested)
    seed_everything(seed)
    torch.set_num_threads(threads)
    return device


def seed_everything(seed: int) -> None:
    """One place that seeds torch and asks for deterministic kernels (bit-for-bit reruns)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    # It imports torch's compiler (1.0-1.8 s in a process of its own): the warm stage server has it loaded already.
    torch.use_deterministic_algorithms(True, warn_only=True)


# Steps with fewer multiply-adds than this (batch rows x parameters) run on one CPU thread: measured here
# (bench/RESULTS.md, issue 27), two threads first pay at about 16M (an MLP [256,256] at batch 256);
# at [128,128] and batch 256 (4.6M) one thread is as fast, and leaves the other core free.
SMALL_STEP = 1 << 24


@contextmanager
def small_step_threads(device: torch.device, work: int) -> Iterator[None]:
    """Run steps of `work` multiply-adds on one CPU thread when they are small; restore after.

    Splitting a sub-millisecond step across threads costs more in synchronisation
    than it saves, and on a busy machine (other stages, `dvc queue start -j 2`) every
    op waits for the descheduled worker: measured here (bench/RESULTS.md), the
    default MLP trains up to 10x faster on one thread under load, and as fast when idle.
    """
    before = torch.get_num_threads()
    if device.type != "cpu" or work > SMALL_STEP or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
