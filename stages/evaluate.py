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

from pipeline import config
from stages import common


def main() -> None:
    """Load params.yaml (one line and exit 2 when it is bad), then `run`."""
    common.main("evaluate", run, [common.METRICS / "evaluation", common.PLOTS / "predictions"])


def run(cfg: config.Config) -> None:
    """Score, write DVC metrics and plots, then log to MLflow and link each training run."""
    # torch and mlflow load here, once params.yaml is known to be valid
    from pipeline import data, tracking
    from stages.evaluate_core import log_scores, score_models, write_outputs

    tracking.preflight()  # a store that is down fails here, before any model is scored
    scored = score_models(cfg)
    write_outputs(cfg, scored)
    data_digest = data.combined_digest(common.data_digests())
    tags = {"device": "cpu", "data.digest": data_digest}
    with tracking.stage_run("evaluate", cfg.mlflow.experiment, common.run_name("evaluate"), tags) as mlflow_run:
        log_scores(mlflow_run, cfg, scored, data_digest)


if __name__ == "__main__":
    main()
