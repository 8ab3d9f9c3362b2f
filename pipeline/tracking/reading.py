"""The read side, for `python -m pipeline.compare`: finished training runs as plain rows, orphans closed first."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from typing import Any

from mlflow.tracking import MlflowClient

from pipeline.tracking.run import close_orphaned_runs
from pipeline.tracking.store import (
    OUTAGE, TrackingError, all_pages, failure_reason, open_existing, permission_refused, permission_status, tracking_uri,
)


@contextmanager
def _reported(uri: str) -> Iterator[None]:
    """A store that fails or refuses while runs are read: one line (compare prints it), not a traceback that would
    show the URI as given, password and all."""
    try:
        yield
    except TrackingError:
        raise
    except OUTAGE as exc:
        if status := permission_status(exc):
            raise permission_refused(uri, status, "reading runs") from None
        raise TrackingError(f"MLflow store at {uri} failed while reading runs ({failure_reason(exc)})") from None


@contextmanager
def _experiment(experiment: str) -> Iterator[tuple[MlflowClient, Any, str]]:
    """(client, `experiment` or None when the store has none, the store's URI); any failure inside is one line."""
    uri = tracking_uri()
    client = open_existing(uri)
    with _reported(uri):
        yield client, client.get_experiment_by_name(experiment), uri


def running_after_cleanup(experiment: str, found_by: str) -> tuple[int, int]:
    """Close this host's orphaned runs in `experiment`; return (closed now, still RUNNING elsewhere or live)."""
    with _experiment(experiment) as (client, exp, _):
        if exp is None:
            return 0, 0
        closed = close_orphaned_runs(client, [exp.experiment_id], found_by)
        running = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    return closed, len(running)


def stage_runs(experiment: str, stage_prefix: str = "train@", max_runs: int = 10000) -> list[dict[str, Any]]:
    """Finished runs of the stages starting with `stage_prefix`, newest first, as plain dicts.

    Each row: run_id, run_name, experiment_id, start_time and end_time (ms),
    params, metrics (latest values) and tags. Used by `python -m pipeline.compare`.
    """
    with _experiment(experiment) as (client, exp, uri):
        if exp is None:
            names = sorted(e.name for e in client.search_experiments())
            raise TrackingError(f"no MLflow experiment {experiment!r} at {uri}; experiments there: {', '.join(names) or 'none'}")
        filter_string = f"tags.stage LIKE '{stage_prefix}%' and attributes.status = 'FINISHED'"
        runs = all_pages(lambda token: client.search_runs(
            [exp.experiment_id], filter_string=filter_string, order_by=["attributes.start_time DESC"],
            max_results=min(1000, max_runs), page_token=token,
        ))
        rows = [
            {
                "run_id": r.info.run_id, "run_name": r.info.run_name, "experiment_id": r.info.experiment_id,
                "start_time": r.info.start_time, "end_time": r.info.end_time,
                "params": dict(r.data.params), "metrics": dict(r.data.metrics), "tags": dict(r.data.tags),
            }
            for r in islice(runs, max_runs)
        ]
    return rows
