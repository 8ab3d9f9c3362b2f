"""The spool: runs kept locally while the MLflow store is down, and `./tasks.sh sync`, which replays them.

When the store fails during a stage, the rest of its run goes to a local MLflow
store of its own under .mlflow-spool/<when>-<stage>-<pid>/ (spool.db, artifacts),
through the same calls; meta.json names the store run it continues, if there was
one, and why it moved; it is written last, whole, so a folder without it is a spool
that was never finished. Operations that reach other runs or the registry (lineage,
registry) are kept in deferred.json, with copies of the files they upload. Sync
copies each run back into the store (the same run where it began there), runs its
deferred operations against the store in order, then drops the folder. When the
spool itself cannot be written (a full disk), the half-made folder is removed and,
for a run the store has, a note of its end (meta.json alone, with `end`) is kept:
sync closes that run with the status and the reason. Sync reports a damaged entry
(no meta.json, no readable run in spool.db) in one line and leaves it.

    ./tasks.sh sync                  # replay every spooled run into the store (`main` here)
    ./tasks.sh sync --upgrade-store  # back up mlflow.db, then `mlflow db upgrade`
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import closing, suppress
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags

from pipeline.errors import PipelineError
from pipeline.files import os_error_cause
from pipeline.tracking import lineage, registry
from pipeline.tracking.provenance import process_started
from pipeline.tracking.store import (
    BATCH, OUTAGE, PARAM_BATCH, PermissionRefused, TrackingError, backup_store, connect, failure_reason, is_sqlite,
    new_sqlite_store, permission_status, preflight, redact, sqlite_file, tracking_uri, upgrade_store, workspace_root,
)

SPOOL_DIR = ".mlflow-spool"  # runs kept locally while the store was down; `./tasks.sh sync` replays them
DEFERRED = "deferred.json"
TRASH = ".synced"  # synced folders are moved here in one rename, then deleted
SYNCED_TAG = "spool.synced"  # on a store run: the spool folder it was synced from (found again by a second sync)
SOURCE_MODEL_TAG = "spool.source_model"  # on a logged model copied by sync: <spool folder>/<spooled model id>

# The operations a run may defer, by name: each takes (client, experiment id, run id, **kwargs).
OPERATIONS = {op.__name__: op for op in (lineage.link_generate_run, lineage.score_training_run, registry.register_model)}
FILE_ARGS = ("picture",)  # arguments that name a local file: copied into the spool, since it may change before sync


class SpoolUnwritable(PipelineError):
    """The spool folder could not be written (no space, read-only, permissions); the message names the file."""


def spool_folders(root: Path | None = None) -> list[Path]:
    """Spooled runs (and notes of a run's end), oldest first."""
    return sorted(p.parent for p in ((root or workspace_root()) / SPOOL_DIR).glob("*/meta.json"))


def damaged_entries(root: Path | None = None) -> dict[Path, str]:
    """Spool folders sync cannot replay, and why: no meta.json (its stage died while writing it, unless that
    process still runs), meta.json unreadable, or a spool.db without exactly one run."""
    found: dict[Path, str] = {}
    for folder in sorted(((root or workspace_root()) / SPOOL_DIR).glob("[!.]*")):
        if not folder.is_dir():
            continue
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except FileNotFoundError:
            pid = folder.name.rsplit("-", 1)[-1]
            if not (pid.isdigit() and process_started(int(pid)) is not None):  # else a stage is writing it now
                found[folder] = "no meta.json: the stage that wrote it stopped before the spool was whole"
            continue
        except (OSError, ValueError) as exc:
            found[folder] = f"meta.json unreadable: {str(exc)[:160]}"
            continue
        if "end" not in meta and (why := _unreadable_spool(folder / "spool.db")):
            found[folder] = why
    return found


def _unreadable_spool(db: Path) -> str | None:
    """Why `db` holds no run to replay (missing, not SQLite, not one run), or None; read-only, without MLflow."""
    if not db.is_file():
        return "no spool.db"
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            (count,) = con.execute("SELECT count(*) FROM runs").fetchone()
    except sqlite3.Error as exc:
        return f"spool.db unreadable ({exc})"
    return None if count == 1 else f"spool.db holds {count} runs, not 1"


def spooled_run_ids() -> list[str]:
    """Store run ids that have the rest of their logging waiting in the spool (the orphan check skips them)."""
    ids = []
    for folder in spool_folders():
        with suppress(OSError, ValueError):
            if run_id := json.loads((folder / "meta.json").read_text()).get("run_id"):
                ids.append(run_id)
    return ids


def open_spool(
    experiment: str, run_name: str, tags: dict[str, str], start_time: int, store_run_id: str | None, reason: str,
) -> tuple[MlflowClient, str, str, Path]:
    """A new spool store holding a copy of the run (same start time, tags, name); return (client, experiment id, run id, folder)."""
    folder = _new_folder(tags.get("stage") or "run")
    try:
        folder.mkdir(parents=True)
        new_sqlite_store(folder / "spool.db")  # a copy, not MLflow's migrations (1.3 s of CPU; store.py)
        client = MlflowClient(f"sqlite:///{folder / 'spool.db'}")
        exp_id = client.create_experiment(experiment, artifact_location=(folder / "artifacts").as_uri())
        # MLflow's context tags (user, source), as mlflow.start_run adds them: a run spooled from its start has them
        run = client.create_run(exp_id, start_time=start_time, tags=resolve_tags(tags), run_name=run_name)
        meta = {"run_id": store_run_id, "experiment": experiment, "stage": tags.get("stage"),
                "store": redact(tracking_uri()), "reason": reason}
        _write_meta(folder, meta)  # last: a folder without it was never a whole spool
    except OUTAGE as exc:  # a full or read-only disk: no half entry is left for sync
        shutil.rmtree(folder, ignore_errors=True)
        raise SpoolUnwritable(unwritable(folder, exc)) from None
    return client, exp_id, run.info.run_id, folder


def _new_folder(stage: str) -> Path:
    """.mlflow-spool/<when>-<stage>-<pid>: the pid tells sync whether its stage still runs."""
    return workspace_root() / SPOOL_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{stage.replace('@', '-')}-{os.getpid()}"


def unwritable(folder: Path, exc: BaseException) -> str:
    """The file that could not be written, relative to the workspace, and the cause in a few words."""
    path = Path(exc.filename) if isinstance(exc, OSError) and exc.filename else folder / "spool.db"
    with suppress(ValueError):
        path = path.relative_to(workspace_root())
    cause = os_error_cause(exc) if isinstance(exc, OSError) else failure_reason(exc)
    return f"{path}: {cause}"


def spool_run_end(experiment: str, stage: str | None, run_id: str, status: str, reason: str) -> Path | None:
    """A note that store run `run_id` ended with `status` for `reason` (meta.json alone, a few hundred bytes), for
    sync to close it; None when even that cannot be written."""
    folder = _new_folder(f"{stage or 'run'}-end")
    meta = {"run_id": run_id, "experiment": experiment, "stage": stage, "store": redact(tracking_uri()), "reason": reason,
            "end": status}
    try:
        folder.mkdir(parents=True)
        _write_meta(folder, meta)
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return folder


def defer(folder: Path, operation: str, kwargs: dict[str, Any]) -> None:
    """Keep an operation on other runs (one of OPERATIONS) in the spool folder, for sync to run against the store."""
    queued = _deferred(folder)
    kwargs = dict(kwargs)
    for arg in FILE_ARGS:
        if arg in kwargs:  # a copy: the workspace's file may be rewritten before sync
            copy = folder / "files" / str(len(queued)) / Path(kwargs[arg]).name  # the name it is uploaded under
            copy.parent.mkdir(parents=True)
            shutil.copy2(kwargs[arg], copy)
            kwargs[arg] = str(copy.relative_to(folder))
    queued.append({"operation": operation, "kwargs": kwargs})
    tmp = folder / f".{DEFERRED}.tmp"
    tmp.write_text(json.dumps(queued, indent=2) + "\n")
    os.replace(tmp, folder / DEFERRED)


def _deferred(folder: Path) -> list[dict[str, Any]]:
    path = folder / DEFERRED
    return json.loads(path.read_text()) if path.exists() else []


def _local_dir(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path))


def _write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """Rewrite meta.json atomically: a sync killed at any moment leaves the old or the new one."""
    tmp = folder / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, folder / "meta.json")


def _store_run(dest: MlflowClient, exp_id: str, run: Any, folder: Path, meta: dict[str, Any]) -> str:
    """The store's run this spooled run continues: the one it began in, else the one an earlier (killed) sync
    created for it (tag spool.synced), else a new one, recorded in meta.json before anything is copied into it."""
    if run_id := meta.get("run_id"):
        try:
            dest.get_run(run_id)
            return run_id
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":  # busy, refused, a server error: not a lost run, and a
                raise  # new one would be a second copy (sync stops, the spool stays for the next one)
            # the store was replaced since: the run comes back as a new one
    found = dest.search_runs([exp_id], filter_string=f"tags.`{SYNCED_TAG}` = '{folder.name}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
    else:
        tags = {k: v for k, v in run.data.tags.items() if k != "mlflow.loggedModels"} | {SYNCED_TAG: folder.name}
        run_id = dest.create_run(exp_id, start_time=run.info.start_time, tags=tags, run_name=run.info.run_name).info.run_id
    _write_meta(folder, meta | {"run_id": run_id})  # the orphan check leaves it alone; a second sync finds it
    return run_id


def _new_points(dest: MlflowClient, run_id: str, metrics: list[Metric]) -> list[Metric]:
    """The spooled metric points the store's run lacks (an earlier sync, or the stage itself, may have logged some)."""
    def key(m: Metric) -> tuple[str, int, int, str]:
        return m.key, m.step, m.timestamp, repr(float(m.value))

    have = {key(m) for name in {m.key for m in metrics} for m in dest.get_metric_history(run_id, name)}
    return [m for m in metrics if key(m) not in have]


def _copy_logged_models(src: MlflowClient, src_run: Any, dest: MlflowClient, run_id: str, exp_id: str,
                        folder: Path) -> int:
    """Re-create the spooled run's logged models (artifacts, MLmodel ids rewritten) in the store; return how many.

    Each copy is tagged with where it came from, so a sync run again finds it instead of
    making another; a copy left PENDING by a killed sync is uploaded and finalized again.
    The store's logged models of this run that the stage left half-made (PENDING: its
    upload died) or made again in the spool (same name) are deleted: one model per model.
    """
    models = [m for m in src.search_logged_models([src_run.info.experiment_id]) if m.source_run_id == src_run.info.run_id]
    sources = {f"{folder.name}/{m.model_id}" for m in models}
    copies = {}
    for m in dest.search_logged_models([exp_id], filter_string=f"source_run_id = '{run_id}'"):
        if m.tags.get(SOURCE_MODEL_TAG) in sources:
            copies[m.tags[SOURCE_MODEL_TAG]] = m
        elif m.status != LoggedModelStatus.READY or m.name in {s.name for s in models}:
            dest.delete_logged_model(m.model_id)
    outputs = {o.model_id for o in (dest.get_run(run_id).outputs.model_outputs or [])}
    for m in models:
        source = f"{folder.name}/{m.model_id}"
        new = copies.get(source) or dest.create_logged_model(
            exp_id, name=m.name, source_run_id=run_id, tags=m.tags | {SOURCE_MODEL_TAG: source}, params=m.params,
            model_type=m.model_type,
        )
        if new.status != LoggedModelStatus.READY:
            with tempfile.TemporaryDirectory(prefix="spool-model-") as tmp:
                local = Path(tmp) / "model"
                shutil.copytree(_local_dir(m.artifact_location), local)
                if (mlmodel := local / "MLmodel").exists():
                    spec = yaml.safe_load(mlmodel.read_text())
                    spec.update(run_id=run_id, model_id=new.model_id)
                    mlmodel.write_text(yaml.safe_dump(spec, sort_keys=False))
                dest.log_model_artifacts(new.model_id, str(local))
        if new.model_id not in outputs:
            dest.log_outputs(run_id, [LoggedModelOutput(new.model_id, 0)])
        if new.status != LoggedModelStatus.READY:
            dest.finalize_logged_model(new.model_id, LoggedModelStatus.READY)
    return len(models)


def _close(folder: Path, meta: dict[str, Any]) -> list[str]:
    """Close the store run a note names with its status and `closed.reason` (a spool that could not be written)."""
    dest, _ = connect(meta["experiment"])
    run_id = meta["run_id"]
    dest.set_tag(run_id, "closed.reason", meta["reason"])
    dest.set_terminated(run_id, meta["end"])
    _drop(folder)
    return [f"{meta.get('stage')}: run {run_id} closed as {meta['end']} ({meta['reason']}) from {SPOOL_DIR}/{folder.name}"]


def _replay(folder: Path) -> list[str]:
    """Copy one spooled run into the store (the same run when it was created there), run its deferred operations,
    then drop the spool folder; the lines to print.

    Every step can be done again: killed at any moment, the next sync finishes the same
    store run, adds only the metric points and models it lacks, and the deferred
    operations check before they write (lineage.py, registry.py).
    """
    meta = json.loads((folder / "meta.json").read_text())
    if "end" in meta:
        return _close(folder, meta)
    src = MlflowClient(f"sqlite:///{folder / 'spool.db'}")
    src_exp = src.get_experiment_by_name(meta["experiment"])
    (run,) = src.search_runs([src_exp.experiment_id])
    dest, exp_id = connect(meta["experiment"])
    run_id = _store_run(dest, exp_id, run, folder, meta)
    params = [Param(k, v) for k, v in run.data.params.items()]
    for i in range(0, len(params), PARAM_BATCH):
        dest.log_batch(run_id, params=params[i : i + PARAM_BATCH])
    metrics = [m for key in run.data.metrics for m in src.get_metric_history(run.info.run_id, key)]
    missing = _new_points(dest, run_id, metrics)
    for i in range(0, len(missing), BATCH):
        dest.log_batch(run_id, metrics=missing[i : i + BATCH])
    tags = {k: v for k, v in run.data.tags.items() if k != "mlflow.loggedModels"} | {SYNCED_TAG: folder.name}
    dest.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    if "closed.reason" in dest.get_run(run_id).data.tags and "closed.reason" not in tags:
        dest.delete_tag(run_id, "closed.reason")  # another clone's orphan check closed it while it waited here
    if run.inputs and run.inputs.dataset_inputs:
        dest.log_inputs(run_id, datasets=run.inputs.dataset_inputs)
    artifacts = _local_dir(run.info.artifact_uri)
    if artifacts.is_dir() and any(artifacts.iterdir()):
        dest.log_artifacts(run_id, str(artifacts))
    n_models = _copy_logged_models(src, run, dest, run_id, exp_id, folder)
    reports = []
    for item in (deferred := _deferred(folder)):
        kwargs = {k: str(folder / v) if k in FILE_ARGS else v for k, v in item["kwargs"].items()}
        if isinstance(report := OPERATIONS[item["operation"]](dest, exp_id, run_id, **kwargs), str):
            reports.append(f"registry: {report}")
    dest.set_terminated(run_id, run.info.status, end_time=run.info.end_time)  # its true status, whoever closed it
    _drop(folder)
    line = (
        f"{meta.get('stage')}: run {run_id} synced as {run.info.status} ({len(params)} params, {len(metrics)} metric "
        f"points, {n_models} model{'s' * (n_models != 1)}, {len(deferred)} deferred operation"
        f"{'s' * (len(deferred) != 1)}) from {SPOOL_DIR}/{folder.name}"
    )
    return [line, *reports]


def _drop(folder: Path) -> None:
    """Remove a synced folder: first moved out of sight in one rename, so a sync killed while deleting leaves no
    half a spool entry for the next one to replay."""
    trash = folder.parent / TRASH
    trash.mkdir(exist_ok=True)
    os.replace(folder, trash / folder.name)
    shutil.rmtree(trash)  # the spool is left as it was before the run failed: nothing but the runs still waiting


def sync_spool() -> list[str]:
    """Replay every spooled run into the store (backed up first when it is the SQLite file); the lines to print.

    The store is checked even when there is nothing to replay, and the answer says so. Damaged
    entries (damaged_entries) are skipped here; `main` reports them.
    """
    uri = preflight()
    shutil.rmtree(workspace_root() / SPOOL_DIR / TRASH, ignore_errors=True)  # left by a sync killed while deleting
    damaged = damaged_entries()
    folders = [f for f in spool_folders() if f not in damaged]
    if not folders:
        return [f"sync: nothing to sync in {SPOOL_DIR}/; the store at {redact(uri)} answers"]
    if is_sqlite(uri):
        backup_store(sqlite_file(uri))
    lines: list[str] = []
    for done, folder in enumerate(folders):
        where = f"{SPOOL_DIR}/{folder.name}: replay into {uri}"
        try:
            lines += _replay(folder)
        except (*OUTAGE, PermissionRefused) as exc:
            if status := permission_status(exc):
                raise TrackingError(
                    f"{where} was refused (HTTP {status}), a permission problem, not an outage; synced {done} of "
                    f"{len(folders)}, the rest stays in {SPOOL_DIR}/; run `./tasks.sh sync` as a user who may write "
                    "runs to the experiment (MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD)"
                ) from None
            raise TrackingError(
                f"{where} failed ({failure_reason(exc)}); synced {done} of {len(folders)}; "
                "run `./tasks.sh sync` again once the store works"
            ) from None
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """`./tasks.sh sync [--upgrade-store]`; errors are one line and exit 1."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args in (["-h"], ["--help"]):
        print(f"usage: ./tasks.sh sync [--upgrade-store]\n\n{__doc__}".rstrip())
        return 0
    if args not in ([], ["--upgrade-store"]):
        print(f"sync: unknown arguments {' '.join(args)}; allowed: none, --upgrade-store, --help", file=sys.stderr)
        return 2
    try:
        if args:
            return upgrade_store()
        lines = sync_spool()
    except PipelineError as exc:
        print(f"sync: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    damaged = damaged_entries()
    for folder, why in damaged.items():
        print(f"sync: {SPOOL_DIR}/{folder.name} is damaged ({why}); nothing was replayed from it and it is kept: "
              "look inside, then delete it", file=sys.stderr)
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
