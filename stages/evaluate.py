"""DVC stage `evaluate`: score every model on the test split against the two exact references.

`python -m stages evaluate` (stages/__main__.py checks params.yaml first, then calls `run`).
Writes metrics/evaluation/<row>.json, one row per model and reference, so `dvc metrics show
metrics/evaluation` prints a line each, and plots/predictions/<model>.{csv,png}. In MLflow it logs an
`evaluate` run, copies each model's test metrics and picture onto the training run that made its
weights (one table shows params beside test MSE), and registers that run's logged model as
`regression-<model>`, moving the alias `champion` to it when its validation MSE is lower (the test
split is for reporting: its MSE is printed beside; docs/team.md says why this lives here): MLflow side
effects only, no DVC output, so nothing reruns for them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import config, data, dvc_params, evaluation, files, models, plots, tracking
from stages import paths

PREDICTIONS = paths.PLOTS / "predictions"
SCORES = paths.METRICS / "evaluation"


def outputs() -> list[Path]:
    """The stage's DVC outputs (named in the line printed when it is interrupted)."""
    return [SCORES, PREDICTIONS]


def run(cfg: config.Config) -> None:
    """Check the data, open the run, score models and references, write metrics and plots, then log and link the
    training runs."""
    truth = data.read_truth(paths.TRUTH)
    digests = paths.verified_split_digests(truth)  # before any work: only the data generate wrote goes on
    with tracking.stage_run("evaluate", cfg.mlflow.experiment, {"device": "cpu"},
                            wait=cfg.mlflow.wait_seconds) as mlflow_run:
        # read
        X_train, y_train = data.read_checked_split(paths.split_path("train"), truth, "train")
        X_val, y_val = data.read_checked_split(paths.split_path("val"), truth, "val")
        X_test, y_test = data.read_checked_split(paths.split_path("test"), truth, "test")
        data_digest = data.combined_digest(digests)
        mlflow_run.set_tags({"data.digest": data_digest})

        trained = {name: models.load_weights(paths.weights_path(name))[0] for name in cfg.models}

        # compute: the references (least squares, the noise floor), then every model against them; each model's
        # validation MSE too, which the registry's champion is chosen on (the test split only reports)
        refs = evaluation.references((X_train, y_train), (X_test, y_test), truth.noise_std, truth.w_true, truth.b_true)
        predictions = {name: models.predict(model, X_test) for name, model in trained.items()}
        scores = refs.rows | {
            name: {"val_mse": evaluation.regression_metrics(y_val, models.predict(model, X_val))["mse"]}
            | evaluation.score(refs, y_test, predictions[name], models.linear_weights(model))
            for name, model in trained.items()
        }

        # write, published together: a metrics file per row; per model the first plot_points test rows as
        # CSV (6 digits) and PNG
        points = cfg.evaluate.plot_points
        with files.publish() as out:
            for row_name, row in scores.items():
                files.write_metrics(out.path(SCORES / f"{row_name}.json"), row)
            for name in cfg.models:
                rows = [(f"{a:.6g}", f"{p:.6g}") for a, p in zip(y_test[:points], predictions[name][:points])]
                files.write_csv(out.path(PREDICTIONS / f"{name}.csv"), ["actual", "predicted"], rows)
                actual, predicted = np.array(rows, dtype=np.float64).T.reshape(2, -1)  # the picture shows the CSV's
                plots.predicted_vs_actual(out.path(PREDICTIONS / f"{name}.png"),
                                          f"{name}: predicted vs actual (test split)", actual, predicted,
                                          refs.noise_floor**0.5)

        # log, then write beside each training run and register its model
        mlflow_run.log_params(dvc_params.stage_params(cfg, "evaluate"))
        mlflow_run.link_generate_run(data_digest)
        mlflow_run.log_metrics(config.flatten(scores))
        mlflow_run.log_artifact(SCORES, "metrics")
        mlflow_run.log_artifact(PREDICTIONS, "plots/predictions")
        mlflow_run.log_artifact(paths.PLOTS / "loss", "plots/loss")
        for name in cfg.models:
            model_digest = files.md5_file(paths.weights_path(name))
            mlflow_run.score_training_run(name, model_digest, scores[name], PREDICTIONS / f"{name}.png")
            row = scores[name]
            if report := mlflow_run.register_model(name, model_digest, row["val_mse"], row["test_mse"], data_digest):
                print(f"registry: {report}")

