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
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import mlflow
import numpy as np
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import PipelineError, first_line, interrupted
from pipeline.tracking import lineage, registry
from pipeline.tracking.provenance import context_tags, process_started, process_tags, run_name
from pipeline.tracking.spool import SpoolUnwritable, defer, spool_run_end, open_spool, spooled_run_ids, unwritable
from pipeline.tracking.store import (
    BATCH, OUTAGE, PARAM_BATCH, PermissionRefused, TrackingError, backup_store, connect, failure_reason, is_server,
    is_sqlite, login_tag, now_ms, once_more_if_raced, permission_refused, permission_status, point_fluent_api_at,
    preflight, print_run_link, redact, set_experiment_tag, sqlite_file, tracking_uri, workspace_root,
)

# The UI's "Share" button stores a runs-table view as an experiment tag with this prefix; the page
# #/experiments/<id>/runs?workflowType=machine_learning&viewStateShareKey=<key> opens it.
VIEW_TAG_PREFIX = "mlflow.sharedViewState."

F = TypeVar("F", bound=Callable[..., Any])
SYSTEM_PREFIX = "system/"  # the keys of MLflow's system metrics
# MLflow's system-metrics monitor says at INFO that it starts and that there is no GPU, at WARNING that it stops when
# the store fails (the run moves to the spool, where a new monitor goes on): none of it belongs in a stage's output
logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
REASON_CHARS = 1000  # a closed run's `closed.reason`: the stage's one-line error, cut to this length


class SpoolFailed(TrackingError):
    """The store failed and the spool could not be written either (a full or read-only disk): the stage stops."""


def _spooling(method: F) -> F:
    """Run a StageRun method against the store; when the store fails, move the run to the spool and run it there.

    A refusal (401/403) is no failure of the store: PermissionRefused, one line, nothing spooled.
    """

    @functools.wraps(method)
    def call(self: StageRun, *args: Any, **kwargs: Any) -> Any:
        if self.spool is None:
            try:
                return method(self, *args, **kwargs)
            except OUTAGE as exc:
                self.refuse_on_permission(exc, f"logging to run {self.run_id} ({method.__name__})")
                self.start_spool(exc)
        with self.spool_writes():
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
        self.model = model  # the name its logged model gets: the model's, as params.yaml's models list it
        self._metrics: list[Metric] = []
        self.curve_steps: dict[str, set[int]] = {}  # the steps of each curve logged so far (or by the run resumed)
        self.system_metrics = False  # MLflow's system-metrics monitor runs beside the run (started by stage_run)
        self.experiment, self.run_name, self.tags = experiment, run_name, dict(tags or {})
        self.start_time = now_ms()
        self.spool: Path | None = None
        self.spool_reason = ""
        self.store_run_id: str | None = None  # the store's run the spool continues, None when it was never created
        self.spool_failure: str | None = None  # why the spool could not be written either: nothing more is logged

    def refuse_on_permission(self, exc: BaseException, doing: str, on: str = "the experiment") -> None:
        """Raise PermissionRefused when the server refused this user: waiting or a sync cannot help, so not spooled."""
        if status := permission_status(exc):
            raise permission_refused(tracking_uri(), status, doing, on) from None

    def start_spool(self, exc: BaseException) -> None:
        """Keep the rest of this run in a new local store under .mlflow-spool/ (same start time, tags, name).

        When the spool cannot be written either, nothing of the run can be kept: SpoolFailed, one line. A run
        the store already has gets a note of its end (FAILED, and why) in the spool instead, a few hundred
        bytes, so sync closes it with the true reason rather than a later orphan check as "killed".
        """
        self.spool_reason = failure_reason(exc)
        self.store_run_id = self.run_id
        try:
            client, exp_id, run_id, folder = open_spool(
                self.experiment, self.run_name, self.tags, self.start_time, self.run_id, self.spool_reason
            )
        except SpoolUnwritable as err:
            self._give_up(f"the run could not be kept in the spool either: {err}")
        point_fluent_api_at(client.tracking_uri)  # Model.log uses the active run: make that the spool's
        with suppress(Exception):
            mlflow.end_run()  # drops the store's run from the active stack (ending it there fails: it is not in the spool)
        mlflow.start_run(run_id=run_id, log_system_metrics=self.system_metrics)
        self.client, self.run_id, self.experiment_id, self.spool = client, run_id, exp_id, folder

    @contextmanager
    def spool_writes(self) -> Iterator[None]:
        """Around a write into the open spool: when its disk fails there (full, read-only), the half-kept run is
        dropped and the stage stops in one line, as when the spool cannot be opened (`SpoolFailed`)."""
        assert self.spool is not None
        try:
            yield
        except OUTAGE as exc:
            folder, self.spool = self.spool, None
            with suppress(Exception):
                mlflow.end_run()  # the spool's fluent run: nothing more is written into it
            shutil.rmtree(folder, ignore_errors=True)  # no half entry for sync: it would replay a run cut short
            self._give_up(f"the spool failed while it kept the run ({unwritable(folder, exc)}), so the part kept "
                          "there was removed")

    def _give_up(self, why: str) -> NoReturn:
        """Nothing more of the run can be kept: note its end for sync when the store has it, and stop the stage."""
        stage = self.tags.get("stage")
        self.spool_failure = f"the MLflow store failed ({self.spool_reason}) and {why}"
        if self.store_run_id is None:
            raise SpoolFailed(f"{self.spool_failure}; nothing of the run is kept; free some space and run the "
                              "stage again") from None
        kept = spool_run_end(self.experiment, stage, self.store_run_id, RunStatus.to_string(RunStatus.FAILED),
                        f"{stage}: {self.spool_failure}")
        outcome = (f"its end is noted in {kept.relative_to(workspace_root())}: `./tasks.sh sync` closes run "
                   f"{self.store_run_id} as FAILED once the store is back" if kept else
                   f"run {self.store_run_id} stays RUNNING in the store")
        raise SpoolFailed(f"{self.spool_failure}; {outcome}; free some space and run the stage again") from None

    def finish(self, status: str, reason: str = "") -> None:
        """Write buffered metrics and end the run with `status` (in the spool if the store failed).

        A run that failed or was stopped keeps why in its tag `closed.reason` (the stage's one line).
        After a spool failure nothing is written: the fluent run is dropped (a last try to end it in the store).
        """
        if self.spool_failure is not None:
            with suppress(Exception):
                mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
            return
        try:
            if reason:
                self.set_tags({"closed.reason": reason[:REASON_CHARS]})
            self.flush()
        finally:
            if self.spool is None:
                try:
                    mlflow.end_run(status)
                except OUTAGE as exc:
                    self.refuse_on_permission(exc, f"ending run {self.run_id}")
                    self.start_spool(exc)
                else:
                    if is_server(self.client.tracking_uri):
                        print_run_link(self.client.tracking_uri, self.experiment_id, self.run_id, self.run_name)
            if self.spool is not None:
                with self.spool_writes():
                    mlflow.end_run(status)
                when = "during the run" if self.store_run_id else "before the run could be created there"
                print(
                    f"{self.tags.get('stage')}: the MLflow store failed {when} ({self.spool_reason}); "
                    f"the run ({status}) is kept in {self.spool.relative_to(workspace_root())}; "
                    "run `./tasks.sh sync` once the store is back",
                    file=sys.stderr,
                )

    def _on_other_runs(self, operation: Callable[..., Any], on: str = "the experiment", **kwargs: Any) -> Any:
        """Run an operation that reaches other runs or the registry, with this run's client, experiment and id.

        When the store fails (now, or earlier in the run), the call is kept in the spool
        instead and `./tasks.sh sync` runs it there, in order, against the store; None then.
        A refusal (401/403) is PermissionRefused naming `on`, the permission's object.
        """
        if self.spool is None:
            try:
                return operation(self.client, self.experiment_id, self.run_id, **kwargs)
            except OUTAGE as exc:
                model = f" for model {kwargs['model']}" if "model" in kwargs else ""
                self.refuse_on_permission(exc, f"running {operation.__name__}{model}", on)
                self.start_spool(exc)
        with self.spool_writes():
            defer(self.spool, operation.__name__, kwargs)
        return None

    def link_generate_run(self, data_digest: str) -> None:
        """Tag this run with the generate run that made its data (tag generate.run_id)."""
        self._on_other_runs(lineage.link_generate_run, data_digest=data_digest)

    def score_training_run(self, model: str, model_digest: str, metrics: dict[str, float], picture: Path) -> None:
        """Copy test metrics and the predicted-vs-actual picture onto the run that trained these weights."""
        self._on_other_runs(lineage.score_training_run, model=model, model_digest=model_digest,
                     metrics={k: float(v) for k, v in metrics.items()}, picture=str(picture), timestamp=now_ms())

    def register_model(self, model: str, model_digest: str, val_mse: float, test_mse: float,
                       data_digest: str) -> str | None:
        """Register the training run's logged model and move `champion` to it when its validation MSE is lower;
        the report line (the test MSE beside)."""
        report = self._on_other_runs(registry.register_model, on=f"registered model {registry.registered_name(model)}",
                              model=model, model_digest=model_digest, val_mse=float(val_mse), test_mse=float(test_mse),
                              data_digest=data_digest)
        if report is None and self.spool is not None:
            return f"{registry.registered_name(model)}: waits in the spool; `./tasks.sh sync` registers it"
        return report

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
        """Buffer a curve's points (one per step), or the part of it since the last call: a step logged before,
        here or by the run this one resumes, is left out, so a curve sent while training has each step once."""
        ts = now_ms()
        logged = self.curve_steps.setdefault(key, set())
        new = [(int(s), float(v)) for s, v in zip(steps, values) if int(s) not in logged]
        logged.update(s for s, _ in new)
        self._metrics += [Metric(key, v, ts, s) for s, v in new]

    @_spooling
    def flush(self) -> None:
        """Write buffered metrics in as few calls as MLflow allows.

        A batch leaves the buffer once written: when the store fails, the batch it failed on
        and the rest go to the spool (sync skips any point the store already has).
        """
        while self._metrics:
            self.client.log_batch(self.run_id, metrics=self._metrics[:BATCH])
            del self._metrics[:BATCH]

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
        set_experiment_tag(self.client, self.experiment_id, VIEW_TAG_PREFIX + key, json.dumps(state))

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
        once_more_if_raced(lambda: self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, tags)]))

    @_spooling
    def log_torch_model(self, weights: str | Path, input_example: np.ndarray) -> str:
        """Log a weights file (pipeline.models.save_weights) as the run's MLflow model (pyfunc from code); its URI."""
        return registry.log_torch_model(self.run_id, self.model, weights, input_example)


@contextmanager
def stage_run(
    stage: str, experiment: str, tags: dict[str, str], name: str | None = None, resume: str | None = None,
    wait: float = 0.0, system_metrics: float | None = None,
) -> Iterator[StageRun]:
    """Check the store, start a run for a stage; end it FINISHED, FAILED, or KILLED (Ctrl-C / SIGTERM).

    A server that is down is asked again for `wait` seconds (params.yaml's
    mlflow.wait_seconds); a store still down or unusable fails here, in one line, before
    the stage works, and so does a server that refuses this user (401/403). A server
    that answers its health check but fails to open the run is an outage: the run is
    spooled from its start and the stage works on. Runs of
    this host left RUNNING by a process that died are closed first. A store that
    fails from here on does not fail the stage: the run is spooled. The run's name is
    the stage's, plus the DVC experiment's when there is one, unless `name` is given.
    `resume`, the id of an interrupted run (from a checkpoint), continues that run when
    the store still has it, ended, in this experiment; else a new run is tagged
    `resumed.from_run_id`; a continued run's curves go on from the steps it has.
    `system_metrics`, a sampling interval in seconds, runs MLflow's system-metrics monitor
    (CPU, memory, disk, network; GPU through nvidia-ml-py) beside the run, a thread of this process.
    """
    uri = preflight(wait, stage)
    all_tags = {"stage": stage, **context_tags(), **process_tags(), **login_tag(uri), **tags}
    name = name or run_name(stage)
    tracked = StageRun(None, None, None, experiment, name, all_tags, all_tags.get("model", "model"))
    if system_metrics is not None:
        mlflow.set_system_metrics_sampling_interval(system_metrics)
        tracked.system_metrics = True
    try:
        client, exp_id = connect(experiment)
        close_orphaned_runs(client, [exp_id], stage)
        if resume and not _resumable(client, exp_id, resume):
            all_tags["resumed.from_run_id"], resume = resume, None
        if resume:
            tracked.curve_steps = _logged_steps(client, resume)
        # the fluent run: MLflow's context tags and Model.log's experiment (see the module docstring)
        run = mlflow.start_run(run_id=resume, experiment_id=exp_id, run_name=None if resume else name, tags=all_tags,
                               log_system_metrics=tracked.system_metrics)
        tracked.client, tracked.run_id, tracked.experiment_id = client, run.info.run_id, exp_id
        tracked.start_time = run.info.start_time
    except OUTAGE as exc:
        if status := permission_status(exc):  # waiting or syncing cannot help: one line, before any work
            raise permission_refused(uri, status, f"creating a run in experiment {experiment!r}") from None
        tracked.start_spool(exc)
    status, reason = RunStatus.to_string(RunStatus.FINISHED), ""
    try:
        yield tracked
    except (KeyboardInterrupt, SystemExit) as exc:
        status, reason = RunStatus.to_string(RunStatus.KILLED), f"{stage}: {interrupted(exc)}"
        raise
    except BaseException as exc:
        status, reason = RunStatus.to_string(RunStatus.FAILED), f"{stage}: {_one_line(exc)}"
        raise
    finally:
        try:
            tracked.finish(status, reason)
        except PermissionRefused:
            if not reason:  # else the stage failed already (on that refusal, most likely): its line is the one to print
                raise
        if all_tags["started_by"] == "hand":  # DVC's log names the stage; a person needs to find the run
            print(f"{stage}: run by hand (tag started_by=hand), MLflow run {tracked.run_id} ({status}) in "
                  f"experiment {experiment!r} at {redact(tracking_uri())}", file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    """A failure in one line (kept as the tag closed.reason): a PipelineError's own message, else the exception's
    type and first line, any URI's userinfo redacted."""
    if isinstance(exc, PipelineError):
        return str(exc)
    first = redact(first_line(exc))
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _resumable(client: MlflowClient, experiment_id: str, run_id: str) -> bool:
    """Whether `run_id` is an interrupted run (KILLED, FAILED) of this experiment, not deleted; it loses `closed.reason`."""
    try:
        old = client.get_run(run_id)
    except MlflowException:
        return False
    if (old.info.experiment_id != experiment_id or old.info.lifecycle_stage != "active"
            or old.info.status in ("RUNNING", "FINISHED")):
        return False
    if "closed.reason" in old.data.tags:
        client.delete_tag(run_id, "closed.reason")
    return True


def _logged_steps(client: MlflowClient, run_id: str) -> dict[str, set[int]]:
    """The steps of each metric run `run_id` has (a resumed run's curves: the points it sent before it was killed)."""
    keys = [key for key in client.get_run(run_id).data.metrics if not key.startswith(SYSTEM_PREFIX)]
    return {key: {m.step for m in client.get_metric_history(run_id, key)} for key in keys}


def close_orphaned_runs(client: MlflowClient, experiment_ids: list[str], found_by: str) -> int:
    """Close RUNNING runs of this host whose process is gone, as KILLED with a `closed.reason` tag; return how many.

    Runs waiting in the spool for `./tasks.sh sync` are left for it. The SQLite
    store is backed up first when there is anything to close.
    """
    host = socket.gethostname().replace("'", "")
    found = client.search_runs(
        experiment_ids, filter_string=f"attributes.status = 'RUNNING' and tags.`process.host` = '{host}'", max_results=1000,
    )
    pending = set(spooled_run_ids())
    dead = [
        r for r in found
        if r.info.run_id not in pending and r.data.tags.get("process.pid", "").isdigit()
        and process_started(int(r.data.tags["process.pid"])) != r.data.tags.get("process.started")
    ]
    if dead and is_sqlite(client.tracking_uri):
        backup_store(sqlite_file(client.tracking_uri))
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    for r in dead:
        reason = (
            f"process {r.data.tags['process.pid']} on {host} was gone when {found_by} (pid {os.getpid()}) "
            f"started at {now}; killed without cleanup (SIGKILL, out of memory, power loss)"
        )
        client.set_tag(r.info.run_id, "closed.reason", reason)
        client.set_terminated(r.info.run_id, RunStatus.to_string(RunStatus.KILLED))
    return len(dead)
