"""What train@<model> does, piece by piece: load the splits, train (a pure core), write, log.

stages/train.py reads as the flow and imports this module once params.yaml is valid,
so torch and mlflow load only then; here every import sits at the top.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline import config, data, dvc_params, files, models, plots, tracking, training
from pipeline.errors import PipelineError
from stages import common, distributed

SWEEP_VIEW = "mlp-sweep"  # the UI's runs page with ?viewStateShareKey=mlp-sweep (docs/mlflow-ui.md)
SWEEP_METRICS = ["test_mse", "ratio_to_noise_floor", "best_val_loss"]


@dataclass(frozen=True)
class Trained:
    """A trained model with its spec, and the summary numbers written to DVC and logged to MLflow."""

    result: training.TrainResult
    spec: models.ModelSpec
    summary: dict[str, float]


def load_splits(truth: data.Truth, device: torch.device) -> training.Splits:
    """Train and val splits as tensors on `device` (y as a column), checked against truth.json."""
    arrays = []
    for split in ("train", "val"):
        X, y = data.read_checked_split(common.split_path(split), truth, split)
        arrays += [torch.from_numpy(X).to(device), torch.from_numpy(y).to(device).unsqueeze(1)]
    return training.Splits(*arrays)


def train(
    cfg: config.Config, name: str, splits: training.Splits, shard: tuple[int, int] = (0, 1), progress: bool = True,
) -> Trained:
    """Train model `name` (the mlp data-parallel when shard's world > 1); no files, no MLflow."""
    n_features = splits.X.shape[1]
    p = cfg.model(name)
    if isinstance(p, config.LinearGDConfig):
        result = training.train_linear_gd(*splits, steps=p.steps, lr=p.lr, progress=progress)
        return _trained(result, models.ModelSpec("linear", n_features))
    if isinstance(p, config.LinearConfig):
        spec = models.ModelSpec("linear", n_features)
        result = training.fit(
            models.build(spec), *splits, optimizer=p.optimizer, lr=p.lr, weight_decay=p.weight_decay,
            batch_size=p.batch_size, epochs=p.epochs, seed=cfg.seed, progress=progress, desc=name,
            cuda_graph=cfg.cuda_graph,
        )
        return _trained(result, spec)
    spec = models.ModelSpec("mlp", n_features, p.hidden, p.activation, p.dropout)
    model = models.build(spec)
    if shard[1] > 1:
        model = distributed.wrap(model, splits.X.device)
    result = training.fit(
        model, *splits, optimizer=p.optimizer, lr=p.lr, weight_decay=p.weight_decay,
        batch_size=p.batch_size, epochs=p.epochs, seed=cfg.seed, schedule=p.schedule, patience=p.patience,
        progress=progress, desc=name, shard=shard, cuda_graph=cfg.cuda_graph,
    )
    if shard[1] > 1:
        result.model = result.model.module  # the plain MLP inside DDP, for saving and logging
    return _trained(result, spec)


def _trained(result: training.TrainResult, spec: models.ModelSpec) -> Trained:
    summary = {
        "final_train_loss": result.history.train_loss[-1],
        "best_val_loss": min(result.history.val_loss),
        "best_step": result.best_step,
        "steps_run": result.history.step[-1] + 1,
        "stopped_early": int(result.stopped_early),
        "n_parameters": models.count_parameters(result.model),
        **result.extra,
    }
    return Trained(result, spec, summary)


def write_outputs(name: str, trained: Trained) -> None:
    """The stage's DVC outputs, each atomically: weights, loss curve (CSV and PNG), summary metrics."""
    result = trained.result
    models.save_weights(result.model, trained.spec, common.weights_path(name))
    files.write_csv(common.loss_plot_path(name), ["step", "train_loss", "val_loss"], result.history.rows())
    steps = result.step_losses  # linear_gd: the loss of every step, not just the logged ones
    train_curve = (range(len(steps)), steps) if steps else (result.history.step, result.history.train_loss)
    x_label = "gradient step (full batch)" if name == "linear_gd" else "epoch"
    plots.loss_curves(common.loss_plot_path(name, ".png"), f"{name}: loss per {x_label.split(' (')[0]}",
                      x_label, train_curve, (result.history.step, result.history.val_loss))
    # Wall time stays out of the DVC metrics file so a rerun gives the same bytes (and dvc.lock);
    # the gradient check is float32 round-off itself, so its file copy keeps 6 decimals (0 = agree to 1e-6).
    check = {k: round(v, 6) for k, v in trained.summary.items() if k == "grad_check_max_abs_diff"}
    files.write_metrics(common.METRICS / "train" / f"{name}.json", trained.summary | check)


def run_tags(name: str, device: torch.device, shard: tuple[int, int], backend: str, data_digest: str) -> dict[str, str]:
    """The run's tags at start: where it trains, which model, on which data, how many ranks."""
    tags = {"device": str(device), "model": name, "data.digest": data_digest}
    if name == "mlp":
        tags["distributed.world_size"] = str(shard[1])
    if backend:
        tags["distributed.backend"] = backend
    return tags


def log_inputs(run: tracking.StageRun, cfg: config.Config, name: str, truth: data.Truth, digests: dict[str, str]) -> None:
    """Before training: params, the sweep view (mlp), the generate run it read, and its datasets."""
    params = dvc_params.stage_params(cfg, f"train@{name}")
    run.log_params(params)
    if name == "mlp":  # the UI view for sweeps: every mlp run, its params beside its test MSE
        run.save_view(SWEEP_VIEW, "tags.stage = 'train@mlp'", [p for p in params if p.startswith("mlp.")], SWEEP_METRICS)
    tracking.link_generate_run(run, data.combined_digest(digests))
    for split in ("train", "val"):
        run.log_dataset(common.split_path(split), split, digests[split], split, truth.rows[split])


def log_diverged(run: tracking.StageRun, cfg: config.Config, name: str, exc: training.Diverged) -> PipelineError:
    """Log the curves up to the divergence; return the one-line error that says what to change."""
    run.log_curve("train_loss", exc.history.step, exc.history.train_loss)
    run.log_curve("val_loss", exc.history.step, exc.history.val_loss)
    lr = cfg.model(name).lr
    return PipelineError(
        f"training diverged: the loss became {exc.loss} at step {exc.step}; "
        f"try a smaller {name}.lr (now {lr:g}, e.g. {lr / 10:g}). No model was written."
    )


def log_trained(run: tracking.StageRun, name: str, trained: Trained, example: torch.Tensor) -> None:
    """After the outputs are written: curves, metrics, weights, loss picture and the MLflow model."""
    result = trained.result
    if result.step_losses:
        run.log_curve("train_loss", range(len(result.step_losses)), result.step_losses)
    else:
        run.log_curve("train_loss", result.history.step, result.history.train_loss)
    run.log_curve("val_loss", result.history.step, result.history.val_loss)
    run.log_metrics(trained.summary | {"train_seconds": result.seconds})
    run.set_tags({"training.loop": result.loop})
    run.log_artifact(common.weights_path(name), "weights")
    run.log_artifact(common.loss_plot_path(name, ".png"), "plots/loss")
    run.log_torch_model(common.weights_path(name), example.cpu().numpy())
    run.set_tags({"model.digest": files.md5_file(common.weights_path(name)), "n_parameters": trained.summary["n_parameters"]})
