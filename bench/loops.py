"""Training throughput: the project's loops against the loops a user would write by hand.

Every loop trains the same model on the same data with the same batch size; each is
timed `repeats` times, interleaved so that a burst of load from elsewhere hits all of
them alike, and the best run counts (the least disturbed one).
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from bench.report import Row
from pipeline import config, data, models, training

if TYPE_CHECKING:  # importing tracking loads mlflow; only the run below needs it
    from pipeline.tracking import StageRun

Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def problem(params: config.Config, device: torch.device) -> Tensors:
    """Train and val splits drawn exactly as the generate stage draws them, on `device`."""
    d = params.data
    rows = d.split.sizes(d.n_samples)
    w, b = data.true_linear(params.seed, d.n_features)
    out = []
    for split_idx, split in enumerate(("train", "val")):
        X, y = data.draw_block(params.seed, split_idx, 0, rows[split], w, b, d.noise_std, d.nonlinearity)
        out += [torch.from_numpy(X).to(device), torch.from_numpy(y).unsqueeze(1).to(device)]
    return out[0], out[1], out[2], out[3]


@contextmanager
def _stopwatch(device: torch.device) -> Iterator[list[float]]:
    """Time the block, GPU work included: `with _stopwatch(dev) as took: ...`, then took[0] is seconds."""
    took: list[float] = []
    _sync(device)
    start = time.perf_counter()
    yield took
    _sync(device)
    took.append(time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mlp(params: config.Config, device: torch.device) -> torch.nn.Module:
    p = params.mlp
    torch.manual_seed(params.seed)
    return models.mlp(params.data.n_features, p.hidden, p.activation, p.dropout).to(device)


def bare_mlp(params: config.Config, t: Tensors, epochs: int) -> float:
    """What a user writes: slice a fresh permutation per batch, Adam with its defaults. Seconds."""
    X, y = t[0], t[1]
    model = _mlp(params, X.device)
    opt = torch.optim.Adam(model.parameters(), lr=params.mlp.lr)
    batch = params.mlp.batch_size
    with _stopwatch(X.device) as took:
        for _ in range(epochs):
            perm = torch.randperm(X.shape[0], device=X.device)
            for i in range(0, X.shape[0], batch):
                idx = perm[i : i + batch]
                loss = F.mse_loss(model(X[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return took[0]


def dataloader_mlp(params: config.Config, t: Tensors, epochs: int) -> float:
    """The tutorial loop: DataLoader(TensorDataset(X, y), shuffle=True). Seconds."""
    X, y = t[0], t[1]
    model = _mlp(params, X.device)
    opt = torch.optim.Adam(model.parameters(), lr=params.mlp.lr)
    loader = DataLoader(TensorDataset(X, y), batch_size=params.mlp.batch_size, shuffle=True)
    with _stopwatch(X.device) as took:
        for _ in range(epochs):
            for xb, yb in loader:
                loss = F.mse_loss(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
    return took[0]


@contextmanager
def tracked_run(store: str, system_metrics: float | None = None) -> Iterator[StageRun]:
    """A real MLflow run of the project's tracking module, on a throwaway SQLite store in `store`; with
    `system_metrics` (seconds), MLflow's system metrics sampled at that interval beside it, as on a training run."""
    from pipeline import tracking
    from pipeline.tracking.store import environ_kept

    with environ_kept("DVC_ROOT", "MLFLOW_TRACKING_URI"):
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.environ["DVC_ROOT"] = store  # tracking resolves the store at the workspace root
        with tracking.stage_run("bench", "bench", {}, "bench", system_metrics=system_metrics) as run:
            yield run


def project_mlp(params: config.Config, t: Tensors, epochs: int, run: StageRun | None, cuda_graph: bool = True,
                live: bool = False) -> float:
    """pipeline.training.fit as the stage calls it, curves logged to `run` when given (`live`: sent while training,
    every mlflow.flush_seconds, as the stage does). Seconds."""
    X, y, Xv, yv = t
    p = params.mlp
    model = _mlp(params, X.device)
    report = None
    if run is not None and live:
        from pipeline.tracking import LiveReport

        report = LiveReport(run, "bench", "epoch", params.mlflow.flush_seconds, io.StringIO())  # its lines: printed
    with _stopwatch(X.device) as took:
        result = training.fit(model, training.Splits(X, y, Xv, yv), training.FitSettings(optimizer=p.optimizer, lr=p.lr, weight_decay=p.weight_decay, batch_size=p.batch_size, epochs=epochs, seed=params.seed, schedule=p.schedule, patience=p.patience, progress=False, cuda_graph=cuda_graph, report=report))
        if run is not None:
            run.log_curve("train_loss", result.history.step, result.history.train_loss)
            run.log_curve("val_loss", result.history.step, result.history.val_loss)
            run.flush()
    return took[0]


def live_cost(params: config.Config, device: torch.device, *, epochs: int, repeats: int) -> list[Row]:
    """Train time of the MLP loop with its curves sent live and MLflow's system metrics on (params.yaml's intervals),
    against the same loop logging its curves at the end in a run without system metrics; same data, same process."""
    t = problem(params, device)
    m = params.mlflow
    with tempfile.TemporaryDirectory(prefix="bench-live-") as store:

        def timed(live: bool) -> float:  # a run of its own each time (MLflow has one active run), opened untimed
            with tracked_run(store, m.system_metrics_seconds if live else None) as run:
                return project_mlp(params, t, epochs, run, live=live)

        project_mlp(params, t, 1, None)  # first-call costs out of the timings
        best = best_of(repeats, {"off": lambda: timed(False), "on": lambda: timed(True)})
    label = "" if device.type == "cpu" else f" [{device.type}]"
    return [Row(f"mlp loop, live logging + system metrics{label}", best["on"], best["off"], "s", "curves at the end, no system metrics",
                ("<=", 1.03), f"flush every {m.flush_seconds:g} s, system metrics every {m.system_metrics_seconds:g} s; "
                f"{epochs} epochs of {t[0].shape[0]} rows, best of {repeats}")]


def bare_gd(params: config.Config, t: Tensors, steps: int) -> float:
    """The source notes' loop, nothing else: forward, loss, backward, update, zero. Seconds."""
    X, y = t[0], t[1]
    lr = params.linear_gd.lr
    w = torch.zeros(X.shape[1], 1, device=X.device, requires_grad=True)
    b = torch.zeros(1, device=X.device, requires_grad=True)
    with _stopwatch(X.device) as took:
        for _ in range(steps):
            loss = ((X @ w + b - y) ** 2).mean()
            loss.backward()
            with torch.no_grad():
                w -= lr * w.grad
                b -= lr * b.grad
            w.grad.zero_()
            b.grad.zero_()
    return took[0]


def project_gd(params: config.Config, t: Tensors, steps: int) -> float:
    """pipeline.training.gradient_descent as train@linear_gd calls it. Seconds."""
    X, y, Xv, yv = t
    with _stopwatch(X.device) as took:
        training.gradient_descent(training.Splits(X, y, Xv, yv), steps=steps, lr=params.linear_gd.lr, progress=False)
    return took[0]


def best_of(repeats: int, loops: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Run each loop `repeats` times, interleaved; the shortest time of each."""
    best = {name: float("inf") for name in loops}
    for _ in range(repeats):
        for name, loop in loops.items():
            best[name] = min(best[name], loop())
    return best


def throughput(params: config.Config, device: torch.device, *, epochs: int, repeats: int, label: str = "") -> list[Row]:
    """Samples/s of the project's MLP and linear_gd loops against their baselines, on `device`."""
    t = problem(params, device)
    n = t[0].shape[0]
    steps = params.linear_gd.steps
    dl_epochs = max(1, epochs // 4)  # the slow baseline: fewer epochs, same samples/s
    suffix = f" [{label}]" if label else ""
    with tempfile.TemporaryDirectory(prefix="bench-store-") as store, tracked_run(store) as run:
        for warm in (bare_mlp, dataloader_mlp):  # first-call costs (allocator, kernels) out of the timings
            warm(params, t, 1)
        project_mlp(params, t, 1, None)
        best = best_of(repeats, {
            "bare": lambda: bare_mlp(params, t, epochs),
            "dataloader": lambda: dataloader_mlp(params, t, dl_epochs),
            "project": lambda: project_mlp(params, t, epochs, run),
            "bare_gd": lambda: bare_gd(params, t, steps),
            "project_gd": lambda: project_gd(params, t, steps),
        })
    rate = {k: n * (dl_epochs if k == "dataloader" else epochs) / v for k, v in best.items() if "gd" not in k}
    gd = {k: n * steps / v for k, v in best.items() if "gd" in k}
    batch = params.mlp.batch_size
    return [
        Row(f"mlp loop, tracking on{suffix}", rate["project"], rate["bare"], "samples/s", "bare eager loop",
            (">=", 1.2), f"batch {batch}, {epochs} epochs of {n} rows, best of {repeats}"),
        Row(f"mlp loop vs DataLoader{suffix}", rate["project"], rate["dataloader"], "samples/s",
            "DataLoader(TensorDataset)", (">=", 4.0)),
        Row(f"linear_gd loop{suffix}", gd["project_gd"], gd["bare_gd"], "samples/s", "bare full-batch loop",
            (">=", 1.0), f"{steps} steps on {n} rows"),
    ]


def _with(params: config.Config, **updates: object) -> config.Config:
    """`params` with dotted-key updates, validated again."""
    from bench.workspace import update_params

    return config.parse(update_params(params.model_dump(mode="json"), dict(updates)))


def gpu(params: config.Config, *, epochs: int, repeats: int, big_rows: int = 1_000_000, big_batch: int = 4096,
        accelerator: str = "cuda") -> list[Row]:
    """The MLP loop on CUDA against the bare eager CUDA loop and this machine's CPU, at default size and large.

    Each figure is samples/s of the full `fit` (CUDA graphs on), timed in-process:
    stage start-up on a GPU box says more about its Python packages than its GPU.
    `accelerator="cpu"` runs the same code without a GPU (the smoke test does).
    """
    cuda, cpu = torch.device(accelerator), torch.device("cpu")
    on_gpu, on_cpu = problem(params, cuda), problem(params, cpu)
    for warm in (lambda: bare_mlp(params, on_gpu, 1), lambda: project_mlp(params, on_gpu, 1, None),
                 lambda: project_mlp(params, on_cpu, 1, None)):
        warm()  # first-call costs (CUDA context, kernels, allocator) out of the timings
    best = best_of(repeats, {
        "graph": lambda: project_mlp(params, on_gpu, epochs, None),
        "eager_project": lambda: project_mlp(params, on_gpu, epochs, None, cuda_graph=False),
        "bare": lambda: bare_mlp(params, on_gpu, epochs),
        "cpu": lambda: project_mlp(params, on_cpu, epochs, None),
    })
    n = on_gpu[0].shape[0]
    rate = {k: n * epochs / v for k, v in best.items()}
    big = _with(params, **{"data.n_samples": big_rows, "mlp.batch_size": big_batch})
    big_epochs = epochs
    big_gpu, big_cpu = problem(big, cuda), problem(big, cpu)
    project_mlp(big, big_gpu, 1, None)
    big_best = best_of(1, {  # seconds of CPU time each: once is enough
        "graph": lambda: project_mlp(big, big_gpu, big_epochs, None),
        "cpu": lambda: project_mlp(big, big_cpu, big_epochs, None),
    })
    big_n = big_gpu[0].shape[0]
    big_rate = {k: big_n * big_epochs / v for k, v in big_best.items()}
    batch = params.mlp.batch_size
    size = f"batch {batch}, {epochs} epochs of {n} rows, best of {repeats}"
    return [
        Row("mlp loop on CUDA (graphs)", rate["graph"], rate["bare"], "samples/s", "bare eager CUDA loop", (">=", 4.0), size),
        Row("mlp loop on CUDA (graphs)", rate["graph"], rate["eager_project"], "samples/s", "same loop, cuda_graph: false",
            None, size),
        Row("mlp loop on CUDA (graphs)", rate["graph"], rate["cpu"], "samples/s", "this machine's CPU, same loop",
            (">=", 2.0), size),
        Row(f"train@mlp loop at {big_rows:,} rows, CUDA", big_rate["graph"], big_rate["cpu"], "samples/s",
            "this machine's CPU", (">=", 10.0), f"batch {big_batch}, {big_epochs} epoch(s) of {big_n} rows"),
    ]


def checkpoint_cost(params: config.Config, *, rows: int, epochs: int, repeats: int) -> list[Row]:
    """Train time of the mlp with checkpoints (as the stage saves them) against none, same data, same process.

    Two intervals: params.yaml's default (every epoch, no sooner than `checkpoint.min_seconds` after the
    last save) and the worst case (every epoch, no minimum). Ratios are time with / time without.
    """
    from pipeline import checkpoint

    big = _with(params, **{"data.n_samples": rows})
    t = problem(big, torch.device("cpu"))
    p, c = big.mlp, big.checkpoint

    def timed(hook: training.Hook) -> float:
        model = _mlp(big, t[0].device)
        settings = training.FitSettings(optimizer=p.optimizer, lr=p.lr, weight_decay=p.weight_decay,
                                        batch_size=p.batch_size, epochs=epochs, seed=big.seed, schedule=p.schedule,
                                        patience=p.patience, progress=False, checkpoint=hook)
        with _stopwatch(t[0].device) as took:
            training.fit(model, training.Splits(*t), settings)
        return took[0]

    timed(training.no_checkpoints)  # first-call costs (allocator, threads) out of the timings
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        path = checkpoint.path_for("train@mlp", Path(tmp))
        best = best_of(repeats, {
            "off": lambda: timed(training.no_checkpoints),
            "default": lambda: timed(checkpoint.Checkpoints(path, "bench", c.every_epochs, c.min_seconds)),
            "every": lambda: timed(checkpoint.Checkpoints(path, "bench", 1, 0.0)),
        })
    n = t[0].shape[0]
    note = f"{epochs} epochs of {n:,} rows, batch {p.batch_size}, best of {repeats}"
    return [
        Row(f"checkpoints at {rows:,} rows (default interval)", best["default"], best["off"], "s", "no checkpoints",
            ("<=", 1.02), f"every {c.every_epochs} epoch(s), >= {c.min_seconds:g} s apart; {note}"),
        Row(f"checkpoints at {rows:,} rows (every epoch)", best["every"], best["off"], "s", "no checkpoints",
            ("<=", 1.02), note),
    ]
