"""Lineage: finding the run that made an input, and writing results beside the run they belong to."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipeline.tracking.store import now_ms

if TYPE_CHECKING:  # run.py looks runs up through latest_run: the import goes one way
    from pipeline.tracking.run import StageRun


def latest_run(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> str | None:
    """The newest finished run whose tags match all of `tags` (lineage look-ups)."""
    clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    clauses.append("attributes.status = 'FINISHED'")
    runs = client.search_runs(
        [experiment_id], filter_string=" and ".join(clauses), order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0].info.run_id if runs else None


def log_metrics_to(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> None:
    """Add metrics to another (finished) run, e.g. test scores beside their training run."""
    ts = now_ms()
    client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()])


def log_artifact_to(client: MlflowClient, run_id: str, path: str | Path, artifact_path: str) -> None:
    """Add a file to another (finished) run, e.g. the predicted-vs-actual picture beside its training run."""
    client.log_artifact(run_id, str(path), artifact_path)


def link_generate_run(run: StageRun, data_digest: str) -> str | None:
    """Tag `run` with the generate run that produced its data (same data.digest); return its id.

    When generate was restored from DVC's run cache, that is the earlier run
    which made the identical files; when no run made them (data pulled from a
    remote into a fresh store), no tag is set.
    """
    found = run.find_run({"stage": "generate", "data.digest": data_digest})
    if found:
        run.set_tags({"generate.run_id": found})
    return found

