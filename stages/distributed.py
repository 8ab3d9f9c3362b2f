"""Data-parallel training for train@mlp: launch through torchrun, join and leave the process group.

The stage calls `launch` when params ask for more than one process: it runs PyTorch's
own launcher (torch.distributed.run, i.e. `torchrun --standalone`) in this process,
which starts `python -m stages.train mlp` once per rank with RANK/WORLD_SIZE/LOCAL_RANK
set. Each rank then calls `launched()` and trains inside `process_group(...)`.
pipeline/training.py only sees a DDP-wrapped model and its (rank, world) shard.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.nn.parallel import DistributedDataParallel

from pipeline.errors import PipelineError

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Rank:
    """This process's place in a torchrun launch."""

    rank: int
    world: int
    local: int


def launched() -> Rank | None:
    """The rank torchrun gave this process, or None when it was not started by torchrun."""
    if not all(var in os.environ for var in LAUNCH_VARS):
        return None
    return Rank(*(int(os.environ[var]) for var in LAUNCH_VARS))


def check_devices(device: torch.device, nproc: int, key: str) -> None:
    """NCCL wants one GPU per process: refuse, before any work, to start more than there are."""
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise PipelineError(
            f"{key}: got {nproc}, but this machine has {torch.cuda.device_count()} CUDA device(s); "
            "allowed on CUDA: at most one process per GPU (or set device: cpu to use gloo)"
        )


def launch(nproc: int, module: str, *args: str) -> None:
    """Run `python -m module args` in `nproc` processes under torchrun; return when all succeed."""
    # torchrun would set 1 thread per process with a warning; share the cores out instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        torchrun.run(torchrun.parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", module, *args]))
    except ChildFailedError as exc:
        ranks = ", ".join(f"rank {r} exit {f.exitcode}" for r, f in sorted(exc.failures.items()))
        raise PipelineError(f"data-parallel training failed ({ranks}); the first message above says why") from None
    except SignalException as exc:
        raise KeyboardInterrupt(f"stopped by signal {exc.sigval.name}; every rank was stopped") from None


@contextmanager
def process_group(rank: Rank | None, device: torch.device) -> Iterator[tuple[torch.device, str]]:
    """Join the group (NCCL on CUDA, this rank's own GPU; gloo on CPU); yield (device, backend); always leave.

    Without a rank (a single process) there is no group: yield (device, "").
    """
    if rank is None:
        yield device, ""
        return
    if device.type == "cuda":
        device = torch.device("cuda", rank.local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, rank=rank.rank, world_size=rank.world)
    try:
        yield device, backend
    finally:
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around a model on `device`: same start weights, gradients averaged in backward()."""
    model.to(device)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
