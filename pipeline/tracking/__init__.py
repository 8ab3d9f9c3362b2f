"""The one package that talks to MLflow (and reads the environment for it), split by job.

    store.py       where runs go (URI, workspace root), /health once, SQLite pre-flight, backup, lock
    provenance.py  git commit, pipeline execution, DVC experiment and process tags
    experiment.py  opening the store for a stage: client, experiment, orphaned runs closed
    run.py         StageRun and stage_run: one MLflow run per stage, spooled when the store fails
    torch_model.py a PyTorch model as an MLflow logged model (safetensors + code, CPU pyfunc); load_torch_module
    pyfunc_model.py that logged model's code, run by MLflow on load (rows checked, predicts on the CPU)
    spool.py       the local stores under .mlflow-spool/; replay.py copies them back (`./tasks.sh sync`)
    lineage.py     the run that made an input; results written beside the run they belong to
    registry.py    registered models and their `champion` alias
    reading.py     the read side of `python -m pipeline.compare`

Callers use the names below; none is a stage dependency in dvc.yaml (logging changes no output).
"""

from pipeline.tracking.lineage import latest_run, link_generate_run, log_artifact_to, log_metrics_to
from pipeline.tracking.provenance import context_tags, pipeline_id
from pipeline.tracking.reading import close_stale_runs, stage_runs
from pipeline.tracking.registry import CHAMPION, champion, register_model, registered_name
from pipeline.tracking.replay import sync_spool
from pipeline.tracking.run import StageRun, stage_run
from pipeline.tracking.spool import SPOOL_DIR
from pipeline.tracking.store import backup_path, backup_store, preflight, tracking_uri
from pipeline.tracking.torch_model import load_torch_module

__all__ = [
    "CHAMPION", "SPOOL_DIR", "StageRun", "backup_path", "backup_store", "champion", "close_stale_runs",
    "context_tags", "latest_run", "link_generate_run", "load_torch_module", "log_artifact_to", "log_metrics_to",
    "pipeline_id", "preflight", "register_model", "registered_name", "stage_run", "stage_runs", "sync_spool", "tracking_uri",
]
