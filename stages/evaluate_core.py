"""What `evaluate` does, piece by piece: score every model (a pure core), write metrics and plots, log.

stages/evaluate.py reads as the flow and imports this module once params.yaml is valid.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from pipeline import (
    config,
    data,
    dvc_params,
    evaluation,
    files,
    models,
    plots,
    tracking,
)
from stages import common

PREDICT_CHUNK = 65536  # rows per forward pass


class Scored(NamedTuple):
    """Every model's and reference's metrics (by row name), and the test predictions behind them."""

    metrics: dict[str, dict[str, float]]
    predictions: dict[str, np.ndarray]  # by model
    actual: np.ndarray  # the test split's y


def predict(path: Path, X: np.ndarray) -> tuple[np.ndarray, nn.Module]:
    """Load weights from safetensors and predict on X; return (predictions, model)."""
    if not path.exists():
        raise data.DataError(f"{path}: missing; run `dvc repro` to train it")
    try:
        model, _ = models.load_weights(path)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise data.DataError(f"{path}: not a weights file this pipeline wrote ({reason}); run `dvc repro` to retrain") from None
    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(X[i : i + PREDICT_CHUNK])) for i in range(0, len(X), PREDICT_CHUNK)])
    return pred.numpy().ravel(), model


def score_models(cfg: config.Config) -> Scored:
    """Every model's test metrics, and the two references: least squares and the noise floor."""
    truth = data.read_truth(common.DATA / "truth.json")
    split_data = {}
    for split in ("train", "test"):
        split_data[split] = data.read_checked_split(common.split_path(split), truth, split)
    (X_train, y_train), (X_test, y_test) = split_data["train"], split_data["test"]

    w_ls, b_ls = evaluation.least_squares(X_train, y_train)
    ls = evaluation.regression_metrics(y_test, X_test.astype(np.float64) @ w_ls + b_ls)
    floor = truth.noise_std**2
    w_true = np.asarray(truth.w_true)
    metrics = {
        "least_squares": {f"test_{k}": v for k, v in ls.items()}
        | evaluation.compare_to_references(ls["mse"], ls["mse"], floor)
        | evaluation.weight_distance(w_ls, b_ls, w_true, truth.b_true),
        "noise_floor": {"test_mse": floor} | evaluation.compare_to_references(floor, ls["mse"], floor),
    }
    predictions = {}
    for name in config.MODEL_NAMES:
        pred, model = predict(common.weights_path(name), X_test)
        scores = {f"test_{k}": v for k, v in evaluation.regression_metrics(y_test, pred).items()}
        scores |= evaluation.compare_to_references(scores["test_mse"], ls["mse"], floor)
        if isinstance(model, nn.Linear):  # linear_gd and linear: how far are their weights from the true ones
            w = model.weight.detach().numpy().ravel()
            scores |= evaluation.weight_distance(w, float(model.bias.item()), w_true, truth.b_true)
        metrics[name] = scores
        predictions[name] = pred
    return Scored(metrics, predictions, y_test)


def write_outputs(cfg: config.Config, scored: Scored) -> None:
    """metrics/evaluation/<row>.json, and per model the first plot_points test rows as CSV (6 digits) and PNG."""
    for row, scores in scored.metrics.items():
        files.write_metrics(common.METRICS / "evaluation" / f"{row}.json", scores)
    noise_std = scored.metrics["noise_floor"]["test_mse"] ** 0.5
    points = cfg.evaluate.plot_points
    for name in config.MODEL_NAMES:
        rows = [(f"{a:.6g}", f"{p:.6g}") for a, p in zip(scored.actual[:points], scored.predictions[name][:points])]
        files.write_csv(common.PLOTS / "predictions" / f"{name}.csv", ["actual", "predicted"], rows)
        actual, predicted = np.array(rows, dtype=np.float64).T.reshape(2, -1)  # the picture shows the CSV's values
        plots.predicted_vs_actual(common.PLOTS / "predictions" / f"{name}.png",
                                  f"{name}: predicted vs actual (test split)", actual, predicted, noise_std)


def log_scores(run: tracking.StageRun, cfg: config.Config, scored: Scored, data_digest: str) -> None:
    """Log the evaluation, then copy each model's scores and picture onto the training run that made its weights."""
    run.log_params(dvc_params.stage_params(cfg, "evaluate"))
    tracking.link_generate_run(run, data_digest)
    run.log_metrics(dvc_params.flatten(scored.metrics))
    run.log_artifact(common.METRICS / "evaluation", "metrics")
    run.log_artifact(common.PLOTS / "predictions", "plots/predictions")
    run.log_artifact(common.PLOTS / "loss", "plots/loss")
    scored_tags = {}
    for name in config.MODEL_NAMES:
        model_digest = files.md5_file(common.weights_path(name))
        train_run = tracking.latest_run(run.client, run.experiment_id, {"stage": f"train@{name}", "model.digest": model_digest})
        if train_run:
            metrics = scored.metrics[name]
            tracking.log_metrics_to(run.client, train_run, metrics)
            tracking.log_artifact_to(run.client, train_run, common.PLOTS / "predictions" / f"{name}.png", "plots/predictions")
            scored_tags[f"scored.{name}.run_id"] = train_run
            report = tracking.register_model(run, name, train_run, metrics["test_mse"], data_digest)
            scored_tags[f"registry.{name}"] = report
            print(f"registry: {report}")
    run.set_tags(scored_tags)
