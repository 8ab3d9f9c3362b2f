"""DVC stage `train@<model>`: train one model, write its weights and curves, log to MLflow.

Usage: python -m stages.train {linear_gd,linear,mlp}
"""

from __future__ import annotations

import csv
import sys
from typing import Any

from pipeline import config
from pipeline.errors import PipelineError
from stages import common, distributed

SWEEP_VIEW = "mlp-sweep"  # the UI's runs page with ?viewStateShareKey=mlp-sweep (docs/mlflow-ui.md)
SWEEP_METRICS = ["test_mse", "ratio_to_noise_floor", "best_val_loss"]


def fit_model(
    cfg: config.Config, name: str, tensors: dict[str, Any], progress: bool = True, shard: tuple[int, int] = (0, 1),
) -> tuple[Any, dict[str, Any]]:
    """Train model `name` on the tensors (the mlp data-parallel when shard's world > 1); return (TrainResult, spec)."""
    from pipeline import models, training

    X, y, X_val, y_val = tensors["X"], tensors["y"], tensors["X_val"], tensors["y_val"]
    n_features = X.shape[1]
    p = cfg.model(name)
    if name == "linear_gd":
        result = training.train_linear_gd(X, y, X_val, y_val, steps=p.steps, lr=p.lr, progress=progress)
        return result, {"kind": "linear", "n_features": n_features}
    if name == "linear":
        result = training.fit(
            models.linear(n_features), X, y, X_val, y_val, optimizer=p.optimizer, lr=p.lr,
            weight_decay=p.weight_decay, batch_size=p.batch_size, epochs=p.epochs, seed=cfg.seed, progress=progress,
            desc=name, cuda_graph=cfg.cuda_graph,
        )
        return result, {"kind": "linear", "n_features": n_features}
    spec = {"kind": "mlp", "n_features": n_features, "hidden": list(p.hidden), "activation": p.activation, "dropout": p.dropout}
    model = models.build(spec)
    if shard[1] > 1:
        model = distributed.wrap(model, X.device)
    result = training.fit(
        model, X, y, X_val, y_val, optimizer=p.optimizer, lr=p.lr, weight_decay=p.weight_decay,
        batch_size=p.batch_size, epochs=p.epochs, seed=cfg.seed, schedule=p.schedule, patience=p.patience,
        progress=progress, desc=name, shard=shard, cuda_graph=cfg.cuda_graph,
    )
    if shard[1] > 1:
        result.model = result.model.module  # the plain MLP inside DDP, for saving and logging
    return result, spec


def load_tensors(truth: Any, device: Any) -> dict[str, Any]:
    """Train and val splits as tensors on `device` (y as a column), checked against truth.json."""
    import torch

    from pipeline import data

    arrays: dict[str, Any] = {}
    for split, key in (("train", ""), ("val", "_val")):
        path = common.split_path(split)
        X, y = data.read_split(path, truth.n_features)
        data.check_consistent(truth, split, X, path)
        arrays[f"X{key}"] = torch.from_numpy(X).to(device)
        arrays[f"y{key}"] = torch.from_numpy(y).to(device).unsqueeze(1)
    return arrays


def _write_loss_csv(name: str, history: Any) -> None:
    from pipeline.files import atomic_path

    with atomic_path(common.loss_plot_path(name)) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "train_loss", "val_loss"])
        writer.writerows(history.rows())


def _write_loss_png(name: str, result: Any) -> None:
    """The loss curves as a picture, x as the model counts: gradient steps (linear_gd) or epochs."""
    from pipeline import plots

    history = result.history
    steps = result.step_losses  # linear_gd: the loss of every step, not just the logged ones
    train = (range(len(steps)), steps) if steps else (history.step, history.train_loss)
    x_label = "gradient step (full batch)" if name == "linear_gd" else "epoch"
    plots.loss_curves(common.loss_plot_path(name, ".png"), f"{name}: loss per {x_label.split(' (')[0]}",
                      x_label, train, (history.step, history.val_loss))


def train_and_write(
    cfg: config.Config, name: str, tensors: dict[str, Any], shard: tuple[int, int] = (0, 1),
) -> tuple[Any, dict[str, Any]]:
    """Train, then write the stage's DVC outputs (weights, loss curve, metrics); no MLflow.

    The stage wraps this in a tracked run; the benchmark also calls it alone to
    measure what tracking costs. Returns (TrainResult, summary metrics).
    """
    from pipeline import files, models

    result, spec = fit_model(cfg, name, tensors, shard=shard)
    models.save_weights(result.model, spec, common.weights_path(name))
    _write_loss_csv(name, result.history)
    _write_loss_png(name, result)
    summary = {
        "final_train_loss": result.history.train_loss[-1],
        "best_val_loss": min(result.history.val_loss),
        "best_step": result.best_step,
        "steps_run": result.history.step[-1] + 1,
        "stopped_early": int(result.stopped_early),
        "n_parameters": models.count_parameters(result.model),
        **result.extra,
    }
    # Wall time stays out of the DVC metrics file so a rerun gives the same bytes (and dvc.lock);
    # the gradient check is float32 round-off itself, so its file copy keeps 6 decimals (0 = agree to 1e-6).
    check = {k: round(v, 6) for k, v in summary.items() if k == "grad_check_max_abs_diff"}
    files.write_metrics(common.METRICS / "train" / f"{name}.json", summary | check)
    return result, summary | {"train_seconds": result.seconds}


def run(cfg: config.Config, name: str) -> None:
    """Train one model; the mlp over `mlp.distributed.nproc` processes (torchrun) when that is > 1."""
    from pipeline import training

    # Cheap checks first: `device: cuda` without CUDA fails right after torch is imported,
    # and a tracking server that is down fails in seconds, both before any data is read.
    nproc = cfg.mlp.distributed.nproc if name == "mlp" else 1
    rank = distributed.launched()
    device = training.resolve_device(cfg.device)
    if rank is None:
        if nproc == 1:
            _train(cfg, name, device)
            return
        distributed.check_devices(device, nproc, "mlp.distributed.nproc")
        distributed.launch(nproc, "stages.train", name)  # runs this stage once per rank, below
        return
    if name != "mlp" or rank.world != nproc:
        raise PipelineError(
            f"started by torchrun with WORLD_SIZE={rank.world}, but only train@mlp runs data-parallel, "
            f"with mlp.distributed.nproc processes (now {nproc}); run `python -m stages.train {name}` directly"
        )
    with distributed.process_group(rank, device) as (rank_device, backend):
        _train(cfg, name, rank_device, rank, backend)


def _train(cfg: config.Config, name: str, device: Any, rank: distributed.Rank | None = None, backend: str = "") -> None:
    """Load data, train, write outputs atomically, then log everything to one MLflow run (rank 0 only)."""
    import torch

    from pipeline import data, files, tracking, training

    if rank is None or rank.rank == 0:
        tracking.preflight()
    training.seed_everything(cfg.seed)
    truth = data.read_truth(common.DATA / "truth.json")
    arrays = load_tensors(truth, device)
    shard = (rank.rank, rank.world) if rank else (0, 1)
    if shard[0] != 0:  # the other ranks train their shards; rank 0 writes and logs
        fit_model(cfg, name, arrays, progress=False, shard=shard)
        return
    digests = common.data_digests()

    stage = f"train@{name}"
    tags = {"device": str(device), "model": name, "data.digest": data.combined_digest(digests)}
    if name == "mlp":
        tags["distributed.world_size"] = str(shard[1])
    if rank is not None:
        tags["distributed.backend"] = backend
    with tracking.stage_run(stage, cfg.mlflow.experiment, common.run_name(stage), tags) as run:
        params = config.stage_params(cfg, stage)
        run.log_params(params)
        if name == "mlp":  # the UI view for sweeps: every mlp run, its params beside its test MSE
            run.save_view(SWEEP_VIEW, "tags.stage = 'train@mlp'", [p for p in params if p.startswith("mlp.")], SWEEP_METRICS)
        tracking.link_generate_run(run, tags["data.digest"])
        for split in ("train", "val"):
            run.log_dataset(common.split_path(split), split, digests[split], split, truth.rows[split])
        try:
            result, summary = train_and_write(cfg, name, arrays, shard)
        except training.Diverged as exc:
            run.log_curve("train_loss", exc.history.step, exc.history.train_loss)
            run.log_curve("val_loss", exc.history.step, exc.history.val_loss)
            lr = cfg.model(name).lr
            raise PipelineError(
                f"training diverged: the loss became {exc.loss} at step {exc.step}; "
                f"try a smaller {name}.lr (now {lr:g}, e.g. {lr / 10:g}). No model was written."
            ) from None

        if result.step_losses:
            run.log_curve("train_loss", range(len(result.step_losses)), result.step_losses)
        else:
            run.log_curve("train_loss", result.history.step, result.history.train_loss)
        run.log_curve("val_loss", result.history.step, result.history.val_loss)
        run.log_metrics(summary)
        run.set_tags({"training.loop": result.loop})
        run.log_artifact(common.weights_path(name), "weights")
        run.log_artifact(common.loss_plot_path(name, ".png"), "plots/loss")
        example = arrays["X_val"][:5].cpu().numpy()
        run.log_torch_model(result.model, example, [f"torch=={torch.__version__.split('+')[0]}"])
        run.set_tags({"model.digest": files.md5_file(common.weights_path(name)), "n_parameters": summary["n_parameters"]})


def _main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in config.MODEL_NAMES:
        print(f"usage: python -m stages.train {{{','.join(config.MODEL_NAMES)}}}", file=sys.stderr)
        sys.exit(2)
    name = sys.argv[1]
    outputs = [common.weights_path(name), common.loss_plot_path(name), common.METRICS / "train" / f"{name}.json"]
    common.main(f"train@{name}", lambda cfg: run(cfg, name), outputs)


if __name__ == "__main__":
    _main()
