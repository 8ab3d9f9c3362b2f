"""An epoch of mini-batch steps replayed as CUDA graphs, for models too small to keep a GPU busy.

A step of the default MLP is a few dozen tiny kernels; launched one by one from
Python, the GPU waits on the launches. Here the steps of an epoch are recorded
once (forward, loss, backward, optimizer step, for every batch) over static
input buffers, and each epoch is then one gather of the shuffled rows into those
buffers and one graph replay.

The numbers are the eager loop's: the same batches in the same order, the same
optimizer arithmetic (fused kernels with the learning rate read from a device
tensor), the learning-rate schedule computed in Python floats exactly as
torch's scheduler computes it for the eager loop, and the weights and optimizer
state put back to their initial values after the warm-up that capture needs.
With `capture=False` the same programs run eagerly (no graph): that is how a
CPU-only machine tests this code.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

# Most steps recorded in one graph: longer epochs replay a graph of this many steps several times.
# Recording costs what one eager pass over its steps costs, so a short graph is cheap to make,
# and replaying it a few more times per epoch costs next to nothing.
MAX_GRAPH_STEPS = 32


def blocker(device: torch.device, model: nn.Module, world: int) -> str | None:
    """Why this run cannot be graphed (None when it can): the reason goes into the run's tags."""
    if device.type != "cuda":
        return f"device is {device.type}"
    if world > 1:
        return "data-parallel (DDP) steps synchronise across processes"
    if any(isinstance(m, nn.Dropout) for m in model.modules()):
        return "dropout draws new random masks every step"
    return None


class _Program:
    """`steps` training steps over a static buffer of rows, one batch after the other."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, like: tuple[torch.Tensor, torch.Tensor],
                 rows: int, batch_size: int) -> None:
        X, y = like
        self.model, self.opt, self.batch_size = model, opt, batch_size
        self.X = torch.zeros((rows, *X.shape[1:]), dtype=X.dtype, device=X.device)
        self.y = torch.zeros((rows, *y.shape[1:]), dtype=y.dtype, device=y.device)
        self.losses = torch.zeros((rows + batch_size - 1) // batch_size, device=X.device)
        self.graph: torch.cuda.CUDAGraph | None = None

    @property
    def rows(self) -> int:
        """Rows consumed per run."""
        return self.X.shape[0]

    def body(self, only: set[int] | None = None) -> None:
        """The eager loop's steps, verbatim, reading from and writing to static tensors only (`only`: these steps)."""
        for j, i in enumerate(range(0, self.rows, self.batch_size)):
            if only is not None and j not in only:
                continue
            loss = F.mse_loss(self.model(self.X[i : i + self.batch_size]), self.y[i : i + self.batch_size])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.losses[j] = loss.detach()

    def warm_up(self) -> None:
        """Run its first and last step, one of each batch shape (creates optimizer state, initialises the kernels);
        on CUDA on a side stream, as capture needs."""
        ends = {0, len(self.losses) - 1}
        with warnings.catch_warnings():  # a capturable optimizer warns when it steps outside a graph: this once is meant
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
            if self.X.device.type != "cuda":
                self.body(ends)
                return
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.body(ends)
            torch.cuda.current_stream().wait_stream(stream)

    def record(self) -> None:
        """Record the body as a CUDA graph: from now on `run` replays it."""
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.body()

    def run(self, X: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Load the given rows of (X, y) into the buffers, run the steps; return their losses."""
        torch.index_select(X, 0, rows, out=self.X)
        torch.index_select(y, 0, rows, out=self.y)
        if self.graph is None:
            self.body()
        else:
            self.graph.replay()
        return self.losses


class GraphedEpoch:
    """Callable `epoch(perm) -> per-batch losses`, equal to the eager epoch over X[perm], y[perm].

    With `capture`, each program is warmed up (weights and optimizer state are
    put back afterwards) and, on CUDA, recorded as a graph; on a CPU the warm-up
    still runs, so tests there check that it leaves no trace.

    The epoch is cut into runs of one program: whole epochs of up to
    MAX_GRAPH_STEPS batches are one program; longer ones repeat a program of
    MAX_GRAPH_STEPS full batches and end with one for the rest.
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor,
                 batch_size: int, *, capture: bool, max_steps: int | None = None) -> None:
        self.X, self.y = X, y
        max_steps = max_steps or MAX_GRAPH_STEPS
        n = X.shape[0]
        n_batches = (n + batch_size - 1) // batch_size
        self.plan: list[tuple[int, _Program]] = []  # (first row, program), in order
        start = 0
        if n_batches > max_steps:
            chunk = _Program(model, opt, (X, y), max_steps * batch_size, batch_size)
            while n - start > chunk.rows:
                self.plan.append((start, chunk))
                start += chunk.rows
        self.plan.append((start, _Program(model, opt, (X, y), n - start, batch_size)))
        self.losses = torch.empty(n_batches, device=X.device)
        if capture:
            with _restored(model, opt):
                for program in {id(p): p for _, p in self.plan}.values():
                    program.warm_up()
                    if X.device.type == "cuda":
                        program.record()

    def __call__(self, perm: torch.Tensor) -> torch.Tensor:
        """One epoch over the rows in `perm`'s order; the per-batch losses stay on the device."""
        j = 0
        for start, program in self.plan:
            losses = program.run(self.X, self.y, perm[start : start + program.rows])
            self.losses[j : j + len(losses)].copy_(losses)
            j += len(losses)
        return self.losses


class _restored:
    """Put the weights and optimizer state back as they were when entered (capture's warm-up steps)."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.model, self.opt = model, opt

    def __enter__(self) -> None:
        if self.opt.state:
            raise ValueError("capture needs a fresh optimizer: its state is reset to zeros after the warm-up")
        self.weights = [p.detach().clone() for p in self.model.parameters()]

    def __exit__(self, *exc: object) -> None:
        """In place, so that recorded graphs keep pointing at the same tensors."""
        with torch.no_grad():
            for p, saved in zip(self.model.parameters(), self.weights):
                p.copy_(saved)
            for state in self.opt.state.values():  # step counts and moments: a fresh optimizer's zeros
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        value.zero_()


class TensorLrSchedule:
    """A per-epoch schedule computed in Python floats, as for the eager loop, fed to a device-tensor learning rate.

    torch's schedulers would compute on the tensor itself (float32, on the
    device); here they run on a float twin optimizer that owns no gradients, and
    each epoch's value is copied into the tensor that the recorded graphs read.
    """

    def __init__(self, opt: torch.optim.Optimizer, lr: float, make: Callable[[torch.optim.Optimizer], LRScheduler]) -> None:
        self.opt = opt
        self.twin = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)  # lr as given: not its float32 tensor
        self.schedule = make(self.twin)

    def step(self) -> None:
        """End of an epoch: advance the schedule, update the tensor in place."""
        self.twin.step()  # moves nothing (no gradient); the scheduler expects a step before its own
        self.schedule.step()
        for group, twin in zip(self.opt.param_groups, self.twin.param_groups):
            group["lr"].fill_(twin["lr"])
