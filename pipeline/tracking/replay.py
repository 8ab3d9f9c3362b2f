"""`./tasks.sh sync`: replay each spooled run into the store (the same run where it began there), then drop it."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.tracking.experiment import connect
from pipeline.tracking.spool import SPOOL_DIR, spool_folders
from pipeline.tracking.store import (
    BATCH, OUTAGE, PARAM_BATCH, TrackingError, backup_path, backup_store, failure_reason, preflight,
)


def _local_dir(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path))


def _copy_logged_models(src: MlflowClient, src_run: Any, dest: MlflowClient, run_id: str, exp_id: str) -> int:
    """Re-create the spooled run's logged models (artifacts, MLmodel ids rewritten) in the store; return how many."""
    models = [m for m in src.search_logged_models([src_run.info.experiment_id]) if m.source_run_id == src_run.info.run_id]
    for m in models:
        new = dest.create_logged_model(exp_id, name=m.name, source_run_id=run_id, tags=m.tags, params=m.params,
                                       model_type=m.model_type)
        with tempfile.TemporaryDirectory(prefix="spool-model-") as tmp:
            local = Path(tmp) / "model"
            shutil.copytree(_local_dir(m.artifact_location), local)
            if (mlmodel := local / "MLmodel").exists():
                spec = yaml.safe_load(mlmodel.read_text())
                spec.update(run_id=run_id, model_id=new.model_id)
                mlmodel.write_text(yaml.safe_dump(spec, sort_keys=False))
            dest.log_model_artifacts(new.model_id, str(local))
        dest.finalize_logged_model(new.model_id, LoggedModelStatus.READY)
        dest.log_outputs(run_id, [LoggedModelOutput(new.model_id, 0)])
    return len(models)


def _replay(folder: Path) -> str:
    """Copy one spooled run into the store (the same run when it was created there), then drop the spool folder."""
    meta = json.loads((folder / "meta.json").read_text())
    src = MlflowClient(f"sqlite:///{folder / 'spool.db'}")
    src_exp = src.get_experiment_by_name(meta["experiment"])
    (run,) = src.search_runs([src_exp.experiment_id])
    dest, exp_id = connect(meta["experiment"])
    run_id = meta.get("run_id")
    if run_id:
        try:
            dest.get_run(run_id)
        except MlflowException:  # the store was replaced since: the run comes back as a new one
            run_id = None
    if not run_id:
        run_id = dest.create_run(exp_id, start_time=run.info.start_time, tags=run.data.tags, run_name=run.info.run_name).info.run_id
    params = [Param(k, v) for k, v in run.data.params.items()]
    for i in range(0, len(params), PARAM_BATCH):
        dest.log_batch(run_id, params=params[i : i + PARAM_BATCH])
    metrics = [m for key in run.data.metrics for m in src.get_metric_history(run.info.run_id, key)]
    for i in range(0, len(metrics), BATCH):
        dest.log_batch(run_id, metrics=metrics[i : i + BATCH])
    tags = {k: v for k, v in run.data.tags.items() if k != "mlflow.loggedModels"} | {"spool.synced": folder.name}
    dest.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    if run.inputs and run.inputs.dataset_inputs:
        dest.log_inputs(run_id, datasets=run.inputs.dataset_inputs)
    artifacts = _local_dir(run.info.artifact_uri)
    if artifacts.is_dir() and any(artifacts.iterdir()):
        dest.log_artifacts(run_id, str(artifacts))
    n_models = _copy_logged_models(src, run, dest, run_id, exp_id)
    dest.set_terminated(run_id, run.info.status, end_time=run.info.end_time)
    shutil.rmtree(folder)
    return (
        f"{meta.get('stage')}: run {run_id} synced as {run.info.status} ({len(params)} params, {len(metrics)} metric "
        f"points, {n_models} model{'s' * (n_models != 1)}) from {SPOOL_DIR}/{folder.name}"
    )


def sync_spool() -> list[str]:
    """Replay every spooled run into the store (backed up first when it is the SQLite file); one line per run."""
    folders = spool_folders()
    if not folders:
        return []
    uri = preflight()
    if path := backup_path(uri):
        backup_store(path)
    lines = []
    for folder in folders:
        try:
            lines.append(_replay(folder))
        except OUTAGE as exc:
            raise TrackingError(
                f"{SPOOL_DIR}/{folder.name}: replay into {uri} failed ({failure_reason(exc)}); "
                f"synced {len(lines)} of {len(folders)}; run `./tasks.sh sync` again once the store works"
            ) from None
    return lines

