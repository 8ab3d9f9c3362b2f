"""A search in MLflow: one parent run per study, the trials' stage runs shown under it.

The parent holds the search space (params), the best value after each finished trial
(metric `best_val_loss`, step = trial number) and the best trial and params (tags).
The stage runs find their parent through provenance.context_tags (`mlflow.parentRunId`,
`search.study`); once a trial is over the search tags them with its number and state.
"""

from __future__ import annotations

import json
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from pipeline.tracking.experiment import connect
from pipeline.tracking.store import now_ms

ROLE = ("search.role", "study")


class StudyRun:
    """The study's parent run, by id."""

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str, study: str) -> None:
        self.client, self.run_id, self.experiment_id, self.study = client, run_id, experiment_id, study

    def record_trial(self, number: int, exp_name: str, state: str, value: float | None,
                     best: tuple[int, float, dict[str, Any]] | None) -> int:
        """After a trial: tag its stage runs (trial, state), log the best so far; return how many runs were tagged."""
        runs = self.client.search_runs(
            [self.experiment_id], max_results=100,
            filter_string=f"tags.`search.study` = '{self.study}' and tags.`dvc.exp_name` = '{exp_name}'",
        )
        tags = {"search.trial": str(number), "search.state": state}
        if value is not None:
            tags["search.value"] = repr(value)
        for run in runs:
            self.client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if best is not None:
            number_, value_, params = best
            self.client.log_batch(
                self.run_id, metrics=[Metric("best_val_loss", value_, now_ms(), number)],
                tags=[RunTag("best.trial", str(number_)), RunTag("best.value", repr(value_)),
                      RunTag("best.params", json.dumps(params)), RunTag("best.dvc_exp", f"{self.study}-t{number_}")],
            )
        return len(runs)

    def close(self, finished: bool) -> None:
        """End the parent run: FINISHED when the study reached its trials, else KILLED (a resume reopens it)."""
        self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FINISHED if finished else RunStatus.KILLED))


def open_study_run(experiment: str, study: str, space: dict[str, str], storage: str) -> StudyRun:
    """The study's parent run in `experiment`, created the first time, marked RUNNING again on a resume."""
    client, exp_id = connect(experiment)
    found = client.search_runs(
        [exp_id], max_results=1, order_by=["attributes.start_time ASC"],
        filter_string=f"tags.`search.study` = '{study}' and tags.`{ROLE[0]}` = '{ROLE[1]}'",
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    else:
        run = client.create_run(exp_id, run_name=f"search {study}", tags={
            "search.study": study, ROLE[0]: ROLE[1], "search.storage": _without_password(storage),
        })
        run_id = run.info.run_id
        client.log_batch(run_id, params=[Param(f"space.{k}", v) for k, v in space.items()])
    return StudyRun(client, run_id, exp_id, study)


def study_trials(experiment: str, study: str) -> list[dict[str, Any]]:
    """The train@mlp runs of a study's trials, as plain rows (for `python -m pipeline.compare --study`)."""
    client, exp_id = connect(experiment)
    runs = client.search_runs(
        [exp_id], max_results=5000,
        filter_string=f"tags.`search.study` = '{study}' and tags.stage = 'train@mlp'",
    )
    return [
        {"run_id": r.info.run_id, "status": r.info.status, "params": dict(r.data.params),
         "metrics": dict(r.data.metrics), "tags": dict(r.data.tags)}
        for r in runs
    ]


def _without_password(url: str) -> str:
    """A storage URL fit for a tag: any password replaced by ***."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL: show only its scheme
        return url.split(":", 1)[0] + ":…"
