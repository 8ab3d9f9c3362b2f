"""Training loops: hand-written gradient descent, and mini-batch training with early stopping.

Both loops keep data and model on one device, batch by slicing a shuffled copy
of the data (no DataLoader, no per-sample Python), and read losses back to the
host once per epoch (or once per `log_every` steps for gradient descent), which
is also where divergence is detected and the progress bar moves.

At those same points a loop calls its `report` callback, when it has one, with what it just
recorded (a `Record`): how a stage shows the run while it trains (pipeline/tracking/live.py);
and its checkpoint hook (pipeline/checkpoint.py) with a
function that builds its whole state: weights, optimizer and scheduler, RNG states, early
stopping, histories. Given that state back as `resume`, a loop continues where it stopped
and ends with the same bytes as a run that was never interrupted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline import graphed
from pipeline.device import small_step_threads
from pipeline.errors import PipelineError
from pipeline.models import linear_from_weights
from pipeline.optim import make_optimizer, make_schedule


# The checkpoint hook: called with the epochs (or steps) done and a function that builds the loop's state.
Hook = Callable[[int, Callable[[], dict[str, Any]]], None]


def no_checkpoints(_done: int, _state: Callable[[], dict[str, Any]]) -> None:
    """The hook of a loop run without checkpoints."""


class Record(NamedTuple):
    """What a loop just recorded, for its `report` callback: the points since the last record, and how far it is."""

    done: int                # epochs (linear_gd: steps) done
    planned: int             # epochs (steps) the loop runs at most
    steps: list[int]         # the train-loss points since the last record: the epoch; linear_gd: every step since
    train_loss: list[float]  # their losses
    val_loss: float          # the validation loss at steps[-1]


Report = Callable[[Record], None]


class Diverged(PipelineError):
    """The loss became NaN or infinite; carries where, and the curve up to there."""

    def __init__(self, step: int, loss: float, history: History) -> None:
        super().__init__(f"loss became {loss} at step {step}")
        self.step = step
        self.loss = loss
        self.history = history


class Splits(NamedTuple):
    """The train and validation tensors, on the device that trains, y as a column [n, 1]."""

    X: torch.Tensor
    y: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor


@dataclass
class History:
    """Loss curves: `step` is the gradient step (full-batch gradient descent) or the epoch (mini-batch)."""

    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)

    def append(self, step: int, train_loss: float, val_loss: float) -> None:
        """Record one point of both curves."""
        self.step.append(step)
        self.train_loss.append(train_loss)
        self.val_loss.append(val_loss)

    @classmethod
    def restored(cls, saved: dict[str, list[Any]]) -> History:
        """A history saved in a checkpoint (its fields as a dict)."""
        return cls(list(saved["step"]), list(saved["train_loss"]), list(saved["val_loss"]))

    def rows(self) -> Iterator[tuple[int, float, float]]:
        """(step, train_loss, val_loss) tuples, for CSV plots."""
        return zip(self.step, self.train_loss, self.val_loss)


@dataclass
class TrainResult:
    """A trained model and what happened on the way."""

    model: nn.Module
    history: History
    best_step: int
    stopped_early: bool
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)
    step_losses: list[float] = field(default_factory=list)
    loop: str = "eager"  # how the steps ran: "cuda_graph", or "eager (why not graphed)"


def mse(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error of a model on (X, y), without building a graph; stays on device."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = F.mse_loss(model(X), y)
    model.train(was_training)
    return loss


def analytic_gradient(X: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of mean((Xw + b − y)²): 2/n·Xᵀr and 2/n·Σr, with r the residual."""
    residual = X @ w + b - y
    n = X.shape[0]
    return 2.0 / n * X.T @ residual, 2.0 / n * residual.sum().reshape(1)


def _check_finite(values: list[float], first_step: int, history: History) -> None:
    for offset, value in enumerate(values):
        if not math.isfinite(value):
            raise Diverged(first_step + offset, value, history)


def gradient_descent(
    splits: Splits, *, steps: int, lr: float, log_every: int = 10, progress: bool = True, desc: str = "gd",
    checkpoint: Hook = no_checkpoints, resume: dict[str, Any] | None = None, report: Report | None = None,
) -> TrainResult:
    """Linear regression by full-batch gradient descent, written out as in the source notes.

    Each step: forward pass, mean squared residual, `loss.backward()` (autograd
    fills w.grad and b.grad), a hand-written update outside autograd, then the
    gradients are zeroed because backward() accumulates into .grad.
    """
    X, y, X_val, y_val = splits
    start = time.perf_counter()
    n_features = X.shape[1]
    w = torch.zeros(n_features, 1, device=X.device, requires_grad=True)
    b = torch.zeros(1, device=X.device, requires_grad=True)
    losses = torch.empty(steps, device=X.device)  # read back in chunks, not every step
    history = History()
    extra: dict[str, float] = {}
    done = 0
    if resume is not None:  # where a checkpoint stopped: weights, the losses so far, the curves
        done, history, extra = resume["done"], History.restored(resume["history"]), resume["extra"]
        with torch.no_grad():
            w.copy_(resume["w"])
            b.copy_(resume["b"])
            losses[:done] = resume["losses"]
        start -= resume["seconds"]

    def state() -> dict[str, Any]:
        return {"done": done, "w": w, "b": b, "losses": losses[:done], "history": vars(history), "extra": extra,
                "seconds": time.perf_counter() - start}

    bar = tqdm(total=steps, initial=done, desc=desc, unit="step", disable=None if progress else True, leave=False)
    with small_step_threads(X.device, X.shape[0] * (n_features + 1)):
        for step in range(done, steps):
            y_hat = X @ w + b                      # forward
            loss = F.mse_loss(y_hat, y)            # mean squared residual: ((y_hat - y) ** 2).mean()
            loss.backward()                        # autograd: d loss / d w, d loss / d b

            if step == 0:                          # autograd vs. the gradient worked out by hand
                with torch.no_grad():
                    gw, gb = analytic_gradient(X, y, w, b)
                    diff = torch.maximum((w.grad - gw).abs().max(), (b.grad - gb).abs().max())
                extra["grad_check_max_abs_diff"] = diff.item()

            with torch.no_grad():                  # the hand-written gradient-descent step
                w -= lr * w.grad
                b -= lr * b.grad
            w.grad.zero_()                         # backward() accumulates: clear for the next step
            b.grad.zero_()
            losses[step] = loss.detach()

            if (step + 1) % log_every == 0 or step + 1 == steps:
                chunk = losses[done : step + 1].tolist()
                _check_finite(chunk, done, history)
                val = ((X_val @ w + b - y_val) ** 2).mean().item()
                history.append(step, chunk[-1], val)
                if report is not None:
                    report(Record(step + 1, steps, list(range(done, step + 1)), chunk, val))
                bar.update(step + 1 - done)
                bar.set_postfix(loss=f"{chunk[-1]:.4g}", val=f"{val:.4g}")
                done = step + 1
                checkpoint(done, state)            # saves every N steps, and on SIGTERM/Ctrl-C
    bar.close()
    model = linear_from_weights(w, b)
    return TrainResult(model, history, steps - 1, False, time.perf_counter() - start, extra, losses.tolist())


@dataclass(frozen=True, kw_only=True)
class LoopSettings:
    """What a training stage gives every loop besides its model's params: the seed, the device's options, the
    process's shard, how it shows progress, and its checkpoint and report hooks."""

    seed: int
    cuda_graph: bool = False
    shard: tuple[int, int] = (0, 1)
    progress: bool = True
    desc: str = "train"
    checkpoint: Hook = no_checkpoints
    resume: dict[str, Any] | None = None  # a state the hook was given: continue from there
    report: Report | None = None  # called with each epoch's Record (the run shown while it trains)


@dataclass(frozen=True, kw_only=True)
class FitSettings(LoopSettings):
    """How `fit` trains: one object instead of a dozen arguments, built by the stage from params.yaml.

    `shard=(rank, world)` is for a DistributedDataParallel model in an initialised process group.
    `patience` None trains every epoch and keeps the final weights; a number stops when the val
    loss stalls that many epochs and keeps the best weights.
    """

    optimizer: str
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    schedule: str = "constant"
    patience: int | None = None
    on_epoch: Callable[[int, float], None] | None = None  # (epoch, val loss) after each epoch; raises to stop (pruning)


def fit(model: nn.Module, splits: Splits, settings: FitSettings) -> TrainResult:
    """Mini-batch training; with `patience`, stop when val loss stalls and keep the best weights.

    With `cuda_graph`, on CUDA each epoch's steps replay as CUDA graphs
    (pipeline/graphed.py): same batches, same arithmetic, far fewer launches.
    Where a graph cannot hold the run (CPU, DDP, dropout) the eager loop runs and
    `TrainResult.loop` says why.

    With `shard=(rank, world)`, every rank draws the same permutation, takes its slice of each
    batch, and scales its summed loss by world/len(batch), so DDP's gradient average
    is exactly the whole batch's mean-loss gradient: single-process steps, up to the
    order of float additions. Epoch losses are averaged across ranks, so every rank
    sees the same numbers and makes the same early-stopping decision.

    `on_epoch(epoch, val_loss)`, when set, is called after every epoch: how a search's trial hears
    the validation loss; an exception it raises (a pruned trial) ends the training there.
    """
    X, y, X_val, y_val = splits
    optimizer, lr, weight_decay = settings.optimizer, settings.lr, settings.weight_decay
    batch_size, epochs, schedule, patience = settings.batch_size, settings.epochs, settings.schedule, settings.patience
    rank, world = settings.shard
    start = time.perf_counter()
    device = X.device
    model.to(device).train()
    why_eager = graphed.blocker(device, model, world) if settings.cuda_graph else "cuda_graph is off"
    if why_eager is None:
        opt = make_optimizer(optimizer, model.parameters(), torch.tensor(lr, device=device), weight_decay, device, True)
        sched = graphed.TensorLrSchedule(opt, lr, lambda twin: make_schedule(schedule, twin, epochs))
        run_epoch = graphed.GraphedEpoch(model, opt, X, y, batch_size, capture=True)
    else:
        opt = make_optimizer(optimizer, model.parameters(), lr, weight_decay, device)
        sched = make_schedule(schedule, opt, epochs)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    history = History()
    best_val, best_step, best_state, stale = math.inf, 0, None, 0
    stopped_early = False
    first = 0
    if settings.resume is not None:  # where a checkpoint stopped: the same weights, moments, schedule and random streams
        resumed = settings.resume
        first, history, best_val, best_step, best_state, stale = (
            resumed["done"], History.restored(resumed["history"]), resumed["best_val"], resumed["best_step"],
            resumed["best_state"], resumed["stale"])
        _restore_loop(resumed, model, opt, sched, generator, in_place=why_eager is None)
        start -= resumed["seconds"]

    def state() -> dict[str, Any]:
        return {"done": epoch + 1, "history": vars(history), "best_val": best_val, "best_step": best_step,
                "best_state": best_state, "stale": stale, "seconds": time.perf_counter() - start,
                **_loop_state(model, opt, sched, generator)}

    bar = tqdm(range(first, epochs), initial=first, total=epochs, desc=settings.desc, unit="epoch",
               disable=None if settings.progress else True, leave=False)
    with small_step_threads(device, batch_size * sum(p.numel() for p in model.parameters())):
        for epoch in bar:
            perm = torch.randperm(X.shape[0], device=device, generator=generator)
            n = X.shape[0]
            if why_eager is None:
                batch_losses = run_epoch(perm)
            else:
                Xs, ys = X[perm], y[perm]                 # one gather per epoch, then cheap slices
                batch_losses = torch.empty((n + batch_size - 1) // batch_size, device=device)
                for j, i in enumerate(range(0, n, batch_size)):
                    if world == 1:
                        loss = F.mse_loss(model(Xs[i : i + batch_size]), ys[i : i + batch_size])
                    else:
                        m = min(batch_size, n - i)
                        lo, hi = i + m * rank // world, i + m * (rank + 1) // world
                        loss = F.mse_loss(model(Xs[lo:hi]), ys[lo:hi], reduction="sum") * (world / m)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    batch_losses[j] = loss.detach()
            sched.step()
            sizes = torch.full_like(batch_losses, batch_size)
            sizes[-1] = n - batch_size * (len(batch_losses) - 1)
            train_loss_t = (batch_losses * sizes).sum() / n
            val_loss_t = mse(model, X_val, y_val)
            epoch_losses = torch.stack([train_loss_t, val_loss_t])
            if world > 1:
                torch.distributed.all_reduce(epoch_losses)
                epoch_losses /= world
            train_loss, val_loss = epoch_losses.tolist()  # one sync per epoch
            if not math.isfinite(train_loss):
                per_batch = batch_losses.tolist()
                # under DDP the bad batch may have been another rank's: then blame this epoch's last one
                bad = next((j for j, v in enumerate(per_batch) if not math.isfinite(v)), len(per_batch) - 1)
                raise Diverged(epoch * len(per_batch) + bad, per_batch[bad], history)
            history.append(epoch, train_loss, val_loss)
            if settings.report is not None:
                settings.report(Record(epoch + 1, epochs, [epoch], [train_loss], val_loss))
            bar.set_postfix(loss=f"{train_loss:.4g}", val=f"{val_loss:.4g}")
            if val_loss < best_val:
                best_val, best_step, stale = val_loss, epoch, 0
                if patience is not None:
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
                if patience is not None and stale >= patience:
                    stopped_early = True
                    break
            if settings.on_epoch is not None:
                settings.on_epoch(epoch, val_loss)
            settings.checkpoint(epoch + 1, state)  # saves every N epochs, and on SIGTERM/Ctrl-C
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_step = history.step[-1]  # no early stopping: the final weights are the ones kept
    model.eval()
    loop = "cuda_graph" if why_eager is None else f"eager ({why_eager})"
    return TrainResult(model, history, best_step, stopped_early, time.perf_counter() - start, loop=loop)


def _schedule(sched: Any) -> torch.optim.lr_scheduler.LRScheduler:
    """The torch scheduler itself (under CUDA graphs it drives a float twin optimizer)."""
    return sched.schedule if isinstance(sched, graphed.TensorLrSchedule) else sched


def _loop_state(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, generator: torch.Generator) -> dict[str, Any]:
    """What `fit` draws from and updates each epoch: weights, optimizer, schedule, every random stream it uses."""
    rng = {"cpu": torch.get_rng_state(), "shuffle": generator.get_state()}
    if generator.device.type == "cuda":  # dropout on CUDA draws from the device's default generator
        rng["cuda"] = torch.cuda.get_rng_state(generator.device)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "schedule": _schedule(sched).state_dict(),
            "rng": rng}


def _restore_loop(saved: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
                  generator: torch.Generator, in_place: bool) -> None:
    """Put `_loop_state` back. `in_place` (CUDA graphs): copy into the tensors the recorded graphs read."""
    model.load_state_dict(saved["model"])
    if in_place:
        params = [p for group in opt.param_groups for p in group["params"]]
        for i, values in saved["optimizer"]["state"].items():
            for k, v in values.items():
                opt.state[params[i]][k].copy_(v)
        for group, kept in zip(opt.param_groups, saved["optimizer"]["param_groups"]):
            group["lr"].copy_(kept["lr"])
    else:
        opt.load_state_dict(saved["optimizer"])
    _schedule(sched).load_state_dict(saved["schedule"])
    if isinstance(sched, graphed.TensorLrSchedule):  # the twin's float lr, which the schedule continues from
        for group, lr in zip(sched.twin.param_groups, sched.schedule.get_last_lr()):
            group["lr"] = lr
    torch.set_rng_state(saved["rng"]["cpu"])
    generator.set_state(saved["rng"]["shuffle"])
    if "cuda" in saved["rng"]:
        torch.cuda.set_rng_state(saved["rng"]["cuda"], generator.device)
