"""Where a run came from: git commit, pipeline execution, DVC experiment, and the process that runs it."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

from pipeline.processes import pid_exists


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _uncommitted_digest() -> str | None:
    """Short hash of uncommitted changes to tracked files (params, code), None when clean.

    dvc.lock and .gitignore files are left out: DVC rewrites them while the
    pipeline runs, and every stage of one execution must get the same answer.
    """
    cmd = ["git", "diff", "HEAD", "--binary", "--", ".", ":(exclude)dvc.lock", ":(exclude,glob)**/.gitignore"]
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=30)
    except OSError:
        return None
    if out.returncode != 0 or not out.stdout:
        return None
    return hashlib.md5(out.stdout).hexdigest()[:8]


def started_by_hand() -> bool:
    """True when a person ran the stage (`python -m stages.train mlp`), not DVC (which sets DVC_ROOT)."""
    return "DVC_ROOT" not in os.environ


def pipeline_id(commit: str) -> str:
    """The `pipeline` tag: one value per pipeline execution, shared by all its stage runs.

    Stages are separate processes, so the id is derived from what they share:
    under `dvc exp run` (queued or not) DVC names the execution, and the name plus
    its baseline commit is unique (`sweet-tuna@1a2b3c4`). A plain `dvc repro` has
    no name, so its id is the commit plus a hash of the uncommitted changes
    (`repro@1a2b3c4+9f8e7d6c`): editing params.yaml or code starts a new group,
    re-running the same state adds to the same one. A stage run by hand is
    `hand@1a2b3c4+…`, so it never joins a DVC execution's group.
    """
    if name := os.environ.get("DVC_EXP_NAME"):
        baseline = os.environ.get("DVC_EXP_BASELINE_REV") or commit
        return f"{name}@{baseline[:7]}"
    dirty = _uncommitted_digest()
    kind = "hand" if started_by_hand() else "repro"
    return f"{kind}@{commit[:7]}" + (f"+{dirty}" if dirty else "")


def run_name(stage: str) -> str:
    """Readable MLflow run name: the stage, plus the DVC experiment when there is one."""
    exp = os.environ.get("DVC_EXP_NAME")
    return f"{stage} [{exp}]" if exp else stage


def context_tags() -> dict[str, str]:
    """Tags every run carries: git commit, pipeline execution; under `dvc exp`, name and baseline; in a search, study and parent run."""
    tags = {"git.commit": _git_commit()}
    tags["mlflow.source.git.commit"] = tags["git.commit"]
    tags["pipeline"] = pipeline_id(tags["git.commit"])
    tags["started_by"] = "hand" if started_by_hand() else "dvc"
    for env, tag in (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev"),
                     ("PIPELINE_SEARCH_STUDY", "search.study"), ("PIPELINE_SEARCH_PARENT_RUN", "mlflow.parentRunId")):
        if value := os.environ.get(env):
            tags[tag] = value
    return tags


def process_started(pid: int) -> str | None:
    """When process `pid` started ('<boot id>:<clock ticks after boot>'), None if it is gone; pid reuse gives a new value."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        if sys.platform.startswith("linux"):
            return None
        return "alive" if pid_exists(pid) else None  # no /proc: whether the pid exists is all there is
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"


def process_tags() -> dict[str, str]:
    """Host, pid and process start of this stage: how a later stage tells that its run was orphaned."""
    return {
        "process.host": socket.gethostname(),
        "process.pid": str(os.getpid()),
        "process.started": process_started(os.getpid()) or "unknown",
    }

