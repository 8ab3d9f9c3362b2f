"""The one package that talks to MLflow (and reads the environment for it), one module per feature.

    store.py       where runs go (URI, workspace root, its credentials redacted), /health once, SQLite checks, the
                   experiment, backup, lock
    provenance.py  the tags that say where a run came from: git commit, pipeline execution, DVC experiment, process
    run.py         StageRun and stage_run: one MLflow run per stage, the one door stages use; orphaned runs closed;
                   MLflow's system metrics beside a training run
    live.py        a training run you can watch: curves and progress sent every few seconds, progress lines
    spool.py       runs kept under .mlflow-spool/ while the store is down, and `./tasks.sh sync`, which replays them
    lineage.py     the run that made an input; test results copied onto the run that trained the model
    registry.py    the logged model (safetensors weights + the code that rebuilds them, a CPU pyfunc), loading it
                   back as an nn.Module, registered versions and their `champion` alias
    pyfunc_model.py that logged model's code, run by MLflow when it loads the model (rows checked, CPU)
    study.py       a search in MLflow (a parent run per study) and a trial's pruning reports
    reading.py     the read side of `python -m pipeline.compare`
    serving.py     the model server `python -m pipeline.serve` starts: MLflow's scoring app behind request limits

Imports go one way (tests/test_layout.py checks it): store, lineage and provenance import no other module here;
registry imports store and lineage; spool those and registry and provenance; run all of them; live, reading and
study import run (reading and study store too); pyfunc_model and serving stand alone.
Callers use the names below; none is a stage dependency in dvc.yaml (logging changes no output).
"""

from pipeline.tracking.live import LiveReport
from pipeline.tracking.provenance import context_tags, pipeline_id
from pipeline.tracking.reading import running_after_cleanup, stage_runs
from pipeline.tracking.registry import CHAMPION, champion, load_torch_module, registered_name
from pipeline.tracking.run import StageRun, stage_run
from pipeline.tracking.spool import SPOOL_DIR, sync_spool
from pipeline.tracking.store import backup_store, preflight, redact, tracking_uri

__all__ = [
    "CHAMPION", "SPOOL_DIR", "LiveReport", "StageRun", "backup_store", "champion", "context_tags", "load_torch_module",
    "pipeline_id", "preflight", "redact", "registered_name", "running_after_cleanup", "stage_run", "stage_runs",
    "sync_spool", "tracking_uri",
]
