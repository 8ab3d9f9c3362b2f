"""Data-parallel training of a model with `distributed.nproc` > 1: launch through torchrun, join and leave the group.

The stage calls `launch` when params ask for more than one process: it runs PyTorch's
own launcher (torch.distributed.run, i.e. `torchrun --standalone`) in this process,
which starts `python -m stages train <model>` once per rank with RANK/WORLD_SIZE/LOCAL_RANK
set. Each rank then calls `launched()` and trains inside `process_group(...)`, whose
Group wraps the model in DDP; pipeline/training.py only sees that model and its shard.
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


def launch(nproc: int, *args: str) -> None:
    """Run `python -m stages args` in `nproc` processes under torchrun; return when all succeed."""
    # torchrun would set 1 thread per process with a warning; share the cores out instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        torchrun.run(torchrun.parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "stages", *args]))
    except ChildFailedError as exc:
        ranks = ", ".join(f"rank {r} exit {f.exitcode}" for r, f in sorted(exc.failures.items()))
        raise PipelineError(f"data-parallel training failed ({ranks}); the first message above says why") from None
    except SignalException as exc:
        raise KeyboardInterrupt(f"stopped by signal {exc.sigval.name}; every rank was stopped") from None


@dataclass(frozen=True)
class Group:
    """Where this process trains: its device, its (rank, world) shard, and whether it writes and logs."""

    device: torch.device
    shard: tuple[int, int] = (0, 1)
    backend: str = ""

    @property
    def lead(self) -> bool:
        """Rank 0 (or the only process): the one that writes the outputs and logs the run."""
        return self.shard[0] == 0

    def tags(self) -> dict[str, str]:
        """The run's tags about data parallelism: the world size, the backend (under torchrun)."""
        tags = {"distributed.world_size": str(self.shard[1])}
        return tags | ({"distributed.backend": self.backend} if self.backend else {})

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel around the model when there are several ranks (same start weights,
        gradients averaged in backward()); the model as it is otherwise."""
        if self.shard[1] == 1:
            return model
        model.to(self.device)
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The plain model inside DDP, for saving and logging."""
        return model.module if isinstance(model, DistributedDataParallel) else model


@contextmanager
def process_group(rank: Rank | None, device: torch.device) -> Iterator[Group]:
    """Join the group (NCCL on CUDA, this rank's own GPU; gloo on CPU), yield this process's Group; always leave.

    Without a rank (a single process) there is no group to join.
    """
    if rank is None:
        yield Group(device)
        return
    if device.type == "cuda":
        device = torch.device("cuda", rank.local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, rank=rank.rank, world_size=rank.world)
    try:
        yield Group(device, (rank.rank, rank.world), backend)
    finally:
        dist.destroy_process_group()
