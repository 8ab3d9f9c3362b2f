"""The spool: a local MLflow store per run under .mlflow-spool/, kept while the real store is down.

A run moves here when the store fails (replay.py copies it back on `./tasks.sh sync`);
its meta.json names the store run it continues, if there was one, and why it moved.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import suppress
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.tracking.store import tracking_uri, workspace_root

SPOOL_DIR = ".mlflow-spool"  # runs kept locally while the store was down; `./tasks.sh sync` replays them


def spool_folders(root: Path | None = None) -> list[Path]:
    """Spooled runs, oldest first."""
    return sorted(p.parent for p in ((root or workspace_root()) / SPOOL_DIR).glob("*/meta.json"))


def spooled_run_ids() -> list[str]:
    """Store run ids that have the rest of their logging waiting in the spool (the zombie check skips them)."""
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
    stage = tags.get("stage", "run").replace("@", "-")
    folder = workspace_root() / SPOOL_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{stage}-{os.getpid()}"
    folder.mkdir(parents=True)
    client = MlflowClient(f"sqlite:///{folder / 'spool.db'}")
    exp_id = client.create_experiment(experiment, artifact_location=(folder / "artifacts").as_uri())
    run = client.create_run(exp_id, start_time=start_time, tags=tags, run_name=run_name)
    meta = {"run_id": store_run_id, "experiment": experiment, "stage": tags.get("stage"),
            "store": tracking_uri(), "reason": reason}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return client, exp_id, run.info.run_id, folder
