"""DVC stage `evaluate`: score every model on the test split against the two exact references.

Writes metrics/evaluation/<row>.json, one row per model and reference so that
`dvc metrics show metrics/evaluation` prints a table with one line each, and
plots/predictions/<model>.{csv,png} (DVC plots), logs an `evaluate` run, and copies each model's test metrics
and predicted-vs-actual picture onto the training run that produced its weights, so one MLflow table shows
params and test MSE, and one run page shows loss curves and predictions. It also registers each training
run's logged model as `regression-<model>` and moves the alias `champion` to it when it scores better
(docs/team.md says why this lives here): MLflow side effects only, no DVC output, so nothing reruns for it.
"""

from __future__ import annotations

import csv
from typing import Any

from pipeline import config
from stages import common

TEST_KEYS = ("mse", "rmse", "mae", "r2")


def _predict(path: Any, X: Any) -> tuple[Any, dict[str, Any], Any]:
    """Load weights from safetensors and predict on X; return (predictions, spec, model)."""
    import torch

    from pipeline import data, models

    from safetensors import SafetensorError

    if not path.exists():
        raise data.DataError(f"{path}: missing; run `dvc repro` to train it")
    try:
        model, spec = models.load_weights(path)
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise data.DataError(f"{path}: not a weights file this pipeline wrote ({reason}); run `dvc repro` to retrain") from None
    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(X[i : i + 65536])) for i in range(0, len(X), 65536)])
    return pred.numpy().ravel(), spec, model


def _write_predictions(name: str, y: Any, pred: Any, points: int, noise_std: float) -> None:
    """The first `points` test rows as CSV (6 significant digits) and as a PNG drawn from those same values."""
    import numpy as np

    from pipeline import plots
    from pipeline.files import atomic_path

    rows = [(f"{a:.6g}", f"{p:.6g}") for a, p in zip(y[:points], pred[:points])]
    with atomic_path(common.PLOTS / "predictions" / f"{name}.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["actual", "predicted"])
        writer.writerows(rows)
    actual, predicted = np.array(rows, dtype=np.float64).T.reshape(2, -1)
    plots.predicted_vs_actual(common.PLOTS / "predictions" / f"{name}.png", f"{name}: predicted vs actual (test split)",
                              actual, predicted, noise_std)


def score_models(cfg: config.Config) -> tuple[dict[str, Any], dict[str, Any]]:
    """Compute every model's test metrics and the references; return (rows by name, predictions)."""
    import numpy as np

    from pipeline import data, evaluation

    truth = data.read_truth(common.DATA / "truth.json")
    split_data = {}
    for split in ("train", "test"):
        path = common.split_path(split)
        X, y = data.read_split(path, truth.n_features)
        data.check_consistent(truth, split, X, path)
        split_data[split] = (X, y)
    (X_train, y_train), (X_test, y_test) = split_data["train"], split_data["test"]

    w_ls, b_ls = evaluation.least_squares(X_train, y_train)
    ls = evaluation.regression_metrics(y_test, X_test.astype(np.float64) @ w_ls + b_ls)
    floor = truth.noise_std**2
    w_true = np.asarray(truth.w_true)
    metrics: dict[str, Any] = {
        "least_squares": {f"test_{k}": v for k, v in ls.items()}
        | evaluation.compare_to_references(ls["mse"], ls["mse"], floor)
        | evaluation.weight_distance(w_ls, b_ls, w_true, truth.b_true),
        "noise_floor": {"test_mse": floor} | evaluation.compare_to_references(floor, ls["mse"], floor),
    }
    predictions: dict[str, Any] = {}
    for name in config.MODEL_NAMES:
        pred, spec, model = _predict(common.weights_path(name), X_test)
        scores = {f"test_{k}": v for k, v in evaluation.regression_metrics(y_test, pred).items()}
        scores |= evaluation.compare_to_references(scores["test_mse"], ls["mse"], floor)
        if spec["kind"] == "linear":
            w = model.weight.detach().numpy().ravel()
            scores |= evaluation.weight_distance(w, float(model.bias.item()), w_true, truth.b_true)
        metrics[name] = scores
        predictions[name] = pred
    predictions["actual"] = y_test
    return metrics, predictions


def run(cfg: config.Config) -> None:
    """Score, write DVC metrics and plots, then log to MLflow and link each training run."""
    from pipeline import data, files, tracking

    tracking.preflight()
    metrics, predictions = score_models(cfg)
    for row, scores in metrics.items():
        files.write_metrics(common.METRICS / "evaluation" / f"{row}.json", scores)
    noise_std = metrics["noise_floor"]["test_mse"] ** 0.5
    for name in config.MODEL_NAMES:
        _write_predictions(name, predictions["actual"], predictions[name], cfg.evaluate.plot_points, noise_std)

    stage = "evaluate"
    model_digests = {name: files.md5_file(common.weights_path(name)) for name in config.MODEL_NAMES}
    data_digest = data.combined_digest(common.data_digests())
    tags = {"device": "cpu", "data.digest": data_digest}
    with tracking.stage_run(stage, cfg.mlflow.experiment, common.run_name(stage), tags) as run:
        run.log_params(config.stage_params(cfg, stage))
        tracking.link_generate_run(run, data_digest)
        run.log_metrics(config.flatten(metrics))
        run.log_artifact(common.METRICS / "evaluation", "metrics")
        run.log_artifact(common.PLOTS / "predictions", "plots/predictions")
        run.log_artifact(common.PLOTS / "loss", "plots/loss")
        scored = {}
        for name in config.MODEL_NAMES:
            train_run = tracking.latest_run(
                run.client, run.experiment_id, {"stage": f"train@{name}", "model.digest": model_digests[name]}
            )
            if train_run:
                tracking.log_metrics_to(run.client, train_run, metrics[name])
                tracking.log_artifact_to(run.client, train_run, common.PLOTS / "predictions" / f"{name}.png", "plots/predictions")
                scored[f"scored.{name}.run_id"] = train_run
                report = tracking.register_model(run, name, train_run, metrics[name]["test_mse"], data_digest)
                scored[f"registry.{name}"] = report
                print(f"registry: {report}")
        run.set_tags(scored)


if __name__ == "__main__":
    common.main("evaluate", run, [common.METRICS / "evaluation", common.PLOTS / "predictions"])
