"""Lineage: the run that made an input, and results written beside the run they belong to.

Each operation takes the store's client, this run's experiment and id, and plain
values, and sets on this run the tags that say what it did: so a stage calls it
through its StageRun, and `./tasks.sh sync` replays it the same way when the store
failed at that moment (spool.py keeps the call).
"""

from __future__ import annotations

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient


def latest_run(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> str | None:
    """The newest finished run whose tags match all of `tags` (lineage look-ups)."""
    clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    clauses.append("attributes.status = 'FINISHED'")
    runs = client.search_runs(
        [experiment_id], filter_string=" and ".join(clauses), order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0].info.run_id if runs else None


def training_run(client: MlflowClient, experiment_id: str, model: str, model_digest: str) -> str | None:
    """The finished train@<model> run that wrote these weights (its model.digest), if the store has it."""
    return latest_run(client, experiment_id, {"stage": f"train@{model}", "model.digest": model_digest})


def link_generate_run(client: MlflowClient, experiment_id: str, run_id: str, data_digest: str) -> None:
    """Tag the run with the generate run that produced its data (same data.digest).

    When generate was restored from DVC's run cache, that is the earlier run which
    made the identical files; when no run made them (data pulled from a remote into
    a fresh store), no tag is set.
    """
    if found := latest_run(client, experiment_id, {"stage": "generate", "data.digest": data_digest}):
        client.set_tag(run_id, "generate.run_id", found)


def score_training_run(
    client: MlflowClient, experiment_id: str, run_id: str, model: str, model_digest: str,
    metrics: dict[str, float], picture: str, timestamp: int,
) -> None:
    """Copy a model's test metrics and picture onto the training run that made its weights; tag the run with it.

    One MLflow table then shows params beside test MSE, and one run page the loss
    curves beside the predictions. Safe to run again (sync does, when the store failed
    half-way): the picture is overwritten, and metrics already logged at `timestamp` are not logged twice.
    """
    if (train_run := training_run(client, experiment_id, model, model_digest)) is None:
        return
    client.log_artifact(train_run, picture, "plots/predictions")
    first = next(iter(metrics), None)
    if first and not any(m.timestamp == timestamp for m in client.get_metric_history(train_run, first)):
        client.log_batch(train_run, metrics=[Metric(k, float(v), timestamp, 0) for k, v in metrics.items()])
    client.log_batch(run_id, tags=[RunTag(f"scored.{model}.run_id", train_run)])
