"""The stage run: one MLflow run per stage execution, logged by run id, spooled locally when the store fails.

MLflow style: every call goes through the client with the run's id. The run is
also MLflow's active (fluent) run, for two reasons only: `mlflow.start_run` is
the public API that stamps MLflow's own context tags (user, source, git repo),
and MLflow's `Model.log` files a logged model under the active run's experiment.
So the run starts and ends through `mlflow.start_run`/`mlflow.end_run`, here and
nowhere else, and nothing else reads the active run.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import numpy as np
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from pipeline.tracking import torch_model
from pipeline.tracking.experiment import connect
from pipeline.tracking.lineage import latest_run
from pipeline.tracking.provenance import context_tags, process_tags
from pipeline.tracking.spool import open_spool
from pipeline.tracking.store import BATCH, OUTAGE, PARAM_BATCH, failure_reason, now_ms, tracking_uri, workspace_root

# The UI's "Share" button stores a runs-table view as an experiment tag with this prefix; the page
# #/experiments/<id>/runs?workflowType=machine_learning&viewStateShareKey=<key> opens it.
VIEW_TAG_PREFIX = "mlflow.sharedViewState."

F = TypeVar("F", bound=Callable[..., Any])


def _spooling(method: F) -> F:
    """Run a StageRun method against the store; when the store fails, move the run to the spool and run it there."""

    @functools.wraps(method)
    def call(self: StageRun, *args: Any, **kwargs: Any) -> Any:
        if self.spool is None:
            try:
                return method(self, *args, **kwargs)
            except OUTAGE as exc:
                self.start_spool(exc)
        return method(self, *args, **kwargs)

    return call  # type: ignore[return-value]


class StageRun:
    """One stage execution = one MLflow run; metrics are buffered and written in batches.

    If the store or server fails after the run began, everything from then on
    (and the run itself, when it could not be created) goes to a local MLflow
    store under .mlflow-spool/, through the same calls; `./tasks.sh sync` replays it.
    """

    def __init__(self, client: MlflowClient | None, run_id: str | None, experiment_id: str | None,
                 experiment: str = "", run_name: str = "", tags: dict[str, str] | None = None,
                 model: str = "model") -> None:
        self.client = client  # type: ignore[assignment]
        self.run_id = run_id  # type: ignore[assignment]
        self.experiment_id = experiment_id  # type: ignore[assignment]
        self.model = model  # the name its logged model gets: mlp, linear, linear_gd
        self._metrics: list[Metric] = []
        self.experiment, self.run_name, self.tags = experiment, run_name, dict(tags or {})
        self.start_time = now_ms()
        self.spool: Path | None = None
        self.spool_reason = ""

    def start_spool(self, exc: BaseException) -> None:
        """Keep the rest of this run in a new local store under .mlflow-spool/ (same start time, tags, name)."""
        self.spool_reason = failure_reason(exc)
        client, exp_id, run_id, folder = open_spool(
            self.experiment, self.run_name, self.tags, self.start_time, self.run_id, self.spool_reason
        )
        mlflow.set_tracking_uri(client.tracking_uri)  # Model.log uses the active run: make that the spool's
        with suppress(Exception):
            mlflow.end_run()  # drops the store's run from the active stack (ending it there fails: it is not in the spool)
        mlflow.start_run(run_id=run_id)
        self.client, self.run_id, self.experiment_id, self.spool = client, run_id, exp_id, folder

    def finish(self, status: str) -> None:
        """Write buffered metrics and end the run with `status` (in the spool if the store failed)."""
        try:
            self.flush()
        finally:
            if self.spool is None:
                try:
                    mlflow.end_run(status)
                except OUTAGE as exc:
                    self.start_spool(exc)
            if self.spool is not None:
                mlflow.end_run(status)
                print(
                    f"{self.tags.get('stage')}: the MLflow store failed during the run ({self.spool_reason}); "
                    f"the run ({status}) is kept in {self.spool.relative_to(workspace_root())}; "
                    "run `./tasks.sh sync` once the store is back",
                    file=sys.stderr,
                )

    @_spooling
    def find_run(self, tags: dict[str, str]) -> str | None:
        """The newest finished run in this run's experiment with all of `tags` (none while spooling)."""
        return latest_run(self.client, self.experiment_id, tags)

    @_spooling
    def log_params(self, params: dict[str, Any]) -> None:
        """Log flat params (values stringified as MLflow stores them)."""
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + PARAM_BATCH], synchronous=True)

    @_spooling
    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set several tags in one call."""
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Buffer summary metrics; they are written on flush."""
        ts = now_ms()
        self._metrics += [Metric(k, float(v), ts, step) for k, v in metrics.items()]

    def log_curve(self, key: str, steps: Sequence[int], values: Sequence[float]) -> None:
        """Buffer a whole curve (one point per step)."""
        ts = now_ms()
        self._metrics += [Metric(key, float(v), ts, int(s)) for s, v in zip(steps, values)]

    @_spooling
    def flush(self) -> None:
        """Write buffered metrics in as few calls as MLflow allows."""
        pending, self._metrics = self._metrics, []
        for i in range(0, len(pending), BATCH):
            self.client.log_batch(self.run_id, metrics=pending[i : i + BATCH])

    @_spooling
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or folder into the run's artifacts."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    @_spooling
    def save_view(self, key: str, filter_string: str, params: Sequence[str], metrics: Sequence[str]) -> None:
        """Store a runs-table view (filter, columns, best first by the first metric) as the UI's Share button does.

        The tag is rewritten by every call, so the view follows the params as they are added.
        """
        columns = [f"params.`{p}`" for p in params] + [f"metrics.`{m}`" for m in metrics]
        state = {
            "searchFilter": filter_string, "orderByKey": columns[len(params)], "orderByAsc": True,
            "selectedColumns": ["tags.`pipeline`", *columns],
        }
        self.client.set_experiment_tag(self.experiment_id, VIEW_TAG_PREFIX + key, json.dumps(state))

    @_spooling
    def log_dict(self, payload: dict[str, Any], artifact_file: str) -> None:
        """Store a dict as a JSON artifact."""
        self.client.log_dict(self.run_id, payload, artifact_file)

    @_spooling
    def log_dataset(self, path: str | Path, name: str, digest: str, context: str, rows: int) -> None:
        """Record a data file as an MLflow dataset input; its digest is the file's content hash."""
        source = LocalArtifactDatasetSource(str(Path(path).resolve()))
        dataset = Dataset(name=name, digest=digest, source_type="local", source=source.to_json())
        tags = [InputTag("mlflow.data.context", context), InputTag("rows", str(rows))]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, tags)])

    @_spooling
    def log_torch_model(self, weights: str | Path, input_example: np.ndarray) -> str:
        """Log a weights file (pipeline.models.save_weights) as the run's MLflow model (pyfunc from code); its URI."""
        return torch_model.log_torch_model(self.run_id, self.model, weights, input_example)


@contextmanager
def stage_run(stage: str, experiment: str, run_name: str, tags: dict[str, str]) -> Iterator[StageRun]:
    """Start a run for a stage; end it FINISHED, FAILED, or KILLED (Ctrl-C / SIGTERM).

    Runs of this host left RUNNING by a process that died are closed first. A
    store that fails from here on does not fail the stage: the run is spooled.
    """
    all_tags = {"stage": stage, **context_tags(), **process_tags(), **tags}
    tracked = StageRun(None, None, None, experiment, run_name, all_tags, all_tags.get("model", "model"))
    try:
        client, exp_id = connect(experiment, found_by=stage)
        # the fluent run: MLflow's context tags and Model.log's experiment (see the module docstring)
        run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=all_tags)
        tracked.client, tracked.run_id, tracked.experiment_id = client, run.info.run_id, exp_id
        tracked.start_time = run.info.start_time
    except OUTAGE as exc:
        tracked.start_spool(exc)
    status = RunStatus.to_string(RunStatus.FINISHED)
    try:
        yield tracked
    except (KeyboardInterrupt, SystemExit):
        status = RunStatus.to_string(RunStatus.KILLED)
        raise
    except BaseException:
        status = RunStatus.to_string(RunStatus.FAILED)
        raise
    finally:
        tracked.finish(status)
        if all_tags["started_by"] == "hand":  # DVC's log names the stage; a person needs to find the run
            print(f"{stage}: run by hand (tag started_by=hand), MLflow run {tracked.run_id} ({status}) in "
                  f"experiment {experiment!r} at {tracking_uri()}", file=sys.stderr)

