"""Open the store for a stage: the client, the experiment (created once, safely), and orphaned runs closed."""

from __future__ import annotations

import os
import socket
import time

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.tracking.provenance import process_started
from pipeline.tracking.spool import spooled_run_ids
from pipeline.tracking.store import (
    ARTIFACT_DIR, TrackingError, backup_path, backup_store, is_server, refusal, store_lock, tracking_uri, use_server,
    workspace_root,
)

# MLflow 3's experiment kind (values: the UI bundle's experiment kinds; its "experiment type" switch
# writes this tag). The 3.17 UI lets the browser's GenAI / Model training toggle decide instead, so
# links add `?workflowType=machine_learning` (docs/mlflow-ui.md); the tag keeps other readers right.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def connect(experiment: str, found_by: str | None = None) -> tuple[MlflowClient, str]:
    """Open the store (creating it and the experiment once, safely); return (client, experiment id).

    With `found_by` (the stage starting), runs of this host whose process died are closed first.
    """
    root = workspace_root()
    uri = tracking_uri(root)
    if is_server(uri):
        use_server(uri)  # a no-op after the stage's pre-flight: one /health check per stage
    mlflow.set_tracking_uri(uri)  # the process-wide store of MLflow's own log_model (and of the fluent run)
    if uri.startswith("sqlite:///"):
        with store_lock(root):
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(
                experiment, artifact_location=(root / ARTIFACT_DIR).as_uri(), tags=dict([EXPERIMENT_KIND])
            )
            if found_by:
                close_zombies(client, [exp_id], found_by)
    else:
        client = MlflowClient(uri)
        try:
            exp = client.get_experiment_by_name(experiment)
            try:
                exp_id = exp.experiment_id if exp else client.create_experiment(experiment, tags=dict([EXPERIMENT_KIND]))
            except MlflowException:  # another stage created it first: no file lock reaches a server
                exp = client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        except MlflowException as exc:
            raise TrackingError(refusal(uri, exc)) from None
        if found_by:
            close_zombies(client, [exp_id], found_by)
    if exp is not None and exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)  # experiments made before the tag, or by the UI
    return client, exp_id



def close_zombies(client: MlflowClient, experiment_ids: list[str], found_by: str) -> int:
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
    if dead and (path := backup_path(client.tracking_uri)):
        backup_store(path)
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    for r in dead:
        reason = (
            f"process {r.data.tags['process.pid']} on {host} was gone when {found_by} (pid {os.getpid()}) "
            f"started at {now}; killed without cleanup (SIGKILL, out of memory, power loss)"
        )
        client.set_tag(r.info.run_id, "closed.reason", reason)
        client.set_terminated(r.info.run_id, RunStatus.to_string(RunStatus.KILLED))
    return len(dead)

