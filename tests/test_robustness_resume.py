"""Killed training resumes: real `dvc repro` killed mid-training, then rerun; outputs and MLflow run as if never killed.

Set-up shared by tests/test_robustness_*.py: tests/helpers.py, and the `baseline` fixture in tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import (
    clone, dvc, edit_checkpoint_state, output_of, run_env, runs, set_params, stage_pids, suite_env,
)


# Long enough to kill mid-training (about 50 steps per epoch on TINY data), a checkpoint every epoch.
LONG = {"mlp.epochs": 60, "mlp.patience": 60, "mlp.batch_size": 8,
        "checkpoint.every_epochs": 1, "checkpoint.min_seconds": 0.0}
CHECKPOINT = Path(".checkpoints") / "train@mlp.safetensors"


def long_params(nproc: int) -> dict[str, Any]:
    """LONG for `nproc` processes. A single process runs an epoch in about 16 ms here, so it needs every one of its
    60 to be killed mid-training; two gloo ranks take several times longer an epoch, and 30 leave as much time."""
    epochs = LONG["mlp.epochs"] if nproc == 1 else LONG["mlp.epochs"] // 2
    return LONG | {"mlp.epochs": epochs, "mlp.patience": epochs, "mlp.distributed.nproc": nproc}


def mlp_outs(repo: Path) -> list[dict[str, Any]]:
    """train@mlp's outs in dvc.lock (paths and md5s)."""
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train@mlp"]["outs"]


@pytest.fixture(scope="module")
def reference(baseline: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    """train@mlp's outs of uninterrupted runs with LONG params, single process and data-parallel, by nproc. The
    data-parallel one runs cold: a warm data-parallel training killed and resumed is compared with ranks that were
    each a process of their own (single-process stages warm and cold: test_warm)."""
    outs = {}
    for nproc in (1, 2):
        repo = clone(baseline, tmp_path_factory.mktemp("reference") / "repo")
        set_params(repo, long_params(nproc))
        dvc(repo, "repro", "train@mlp", env=run_env(PIPELINE_WARM="0") if nproc > 1 else None)
        assert not (repo / CHECKPOINT).exists()  # a finished stage removes its checkpoint
        outs[nproc] = mlp_outs(repo)
    return outs


def kill_mid_training(repo: Path, spawn: Any, sig: signal.Signals) -> str:
    """`dvc repro train@mlp`, killed by `sig` once a periodic checkpoint exists; what it printed."""
    repro = spawn([sys.executable, "-m", "dvc", "repro", "train@mlp"], repo)
    deadline = time.monotonic() + 120
    while not (repo / CHECKPOINT).exists():
        assert repro.poll() is None, f"ended before a checkpoint: {repro.communicate()}"
        assert time.monotonic() < deadline, "no checkpoint in 120 s"
        time.sleep(0.1)
    pids = stage_pids(repo)
    for pid in pids if sig == signal.SIGKILL else pids[:1]:  # SIGKILL: every process, as a preemption does
        os.kill(pid, sig)
    out, err = repro.communicate(timeout=120)
    assert repro.returncode != 0
    return out + err


def resumed_from(text: str) -> int:
    """The epoch in the stage's 'resuming from … after epoch N' line."""
    line = next(line for line in text.splitlines() if line.startswith("train@mlp: resuming from "))
    assert str(CHECKPOINT) in line
    return int(line.rsplit(" ", 1)[1])


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "nproc", "stage_start"), [
    *((sig, nproc, "warm") for nproc in (1, 2) for sig in (signal.SIGKILL, signal.SIGTERM)),
    # cold: SIGKILL reaches the stage process itself, not a client (SIGTERM cold: test_robustness_interrupts; the
    # data-parallel reference is cold)
    (signal.SIGKILL, 1, "cold"),
], ids=lambda v: {1: "single", 2: "data-parallel"}.get(v, getattr(v, "name", v)), indirect=["stage_start"])
def test_killed_training_resumes_to_the_same_outputs_and_the_same_run(
    baseline: Path, tmp_path: Path, spawn: Any, reference: dict[int, list[dict[str, Any]]],
    sig: signal.Signals, nproc: int, stage_start: str,
) -> None:
    repo = clone(baseline, tmp_path / "repo")
    params = long_params(nproc)
    set_params(repo, params)
    killed = kill_mid_training(repo, spawn, sig)
    if sig == signal.SIGTERM:
        assert "train@mlp: interrupted (stopped by signal SIGTERM" in killed and "the next run resumes from it" in killed
    assert (repo / CHECKPOINT).exists()

    text = output_of(dvc(repo, "repro", "train@mlp", env=suite_env()))  # the resume, started as the suite's stages
    epoch = resumed_from(text)
    assert 1 <= epoch < params["mlp.epochs"]
    assert mlp_outs(repo) == reference[nproc]
    assert not (repo / CHECKPOINT).exists()

    from mlflow.tracking import MlflowClient

    (run,) = [r for r in runs(repo) if r.data.tags.get("stage") == "train@mlp"]  # the same run, continued
    assert run.info.status == "FINISHED" and run.data.tags["resumed.from_epoch"] == str(epoch)
    assert "closed.reason" not in run.data.tags
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    for key in ("train_loss", "val_loss"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(params["mlp.epochs"]))  # one point per epoch


@pytest.mark.slow
@pytest.mark.bad_input
def test_a_checkpoint_of_other_params_or_a_damaged_one_is_not_used(
    baseline: Path, tmp_path: Path, spawn: Any, reference: dict[int, list[dict[str, Any]]],
) -> None:
    repo = clone(baseline, tmp_path / "repo")
    set_params(repo, LONG | {"mlp.lr": 0.01})
    kill_mid_training(repo, spawn, signal.SIGTERM)
    set_params(repo, {"mlp.lr": 0.003})  # the committed lr: the reference's params
    path = repo / CHECKPOINT
    kept = path.read_bytes()
    text = output_of(dvc(repo, "repro", "train@mlp"))
    assert "train@mlp: checkpoint not used: .checkpoints/train@mlp.safetensors belongs to other params, data or code" in text
    assert "resuming from" not in text and mlp_outs(repo) == reference[1]

    path.parent.mkdir(exist_ok=True)  # the stage finished and removed it: put back a damaged copy
    path.write_bytes(kept[: len(kept) // 2])
    set_params(repo, {"mlp.epochs": LONG["mlp.epochs"] + 1})  # the stage must run again
    text = output_of(dvc(repo, "repro", "train@mlp"))
    lines = [line for line in text.splitlines() if "checkpoint not used" in line]
    assert len(lines) == 1 and "is damaged or truncated" in lines[0] and "training from scratch" in lines[0]
    assert "resuming from" not in text and "Traceback" not in text
    statuses = sorted(r.info.status for r in runs(repo) if r.data.tags.get("stage") == "train@mlp")
    assert statuses == ["FINISHED", "FINISHED", "KILLED"]  # no resumed run: each rerun opened its own


@pytest.mark.slow
@pytest.mark.bad_input
def test_a_checkpoint_with_edited_state_is_refused_and_training_starts_over(
    baseline: Path, tmp_path: Path, spawn: Any, reference: dict[int, list[dict[str, Any]]],
) -> None:
    """The issue's case end to end ("done" moved ten epochs on); every other edit: tests/test_checkpoint.py."""
    repo = clone(baseline, tmp_path / "repo")
    set_params(repo, LONG)
    kill_mid_training(repo, spawn, signal.SIGTERM)
    edit_checkpoint_state(repo / CHECKPOINT,  # a valid file, its tensors and digest as saved
                          lambda s: re.sub(r'\["done", (\d+)\]', lambda m: f'["done", {int(m[1]) + 10}]', s))
    text = output_of(dvc(repo, "repro", "train@mlp"))
    lines = [line for line in text.splitlines() if "checkpoint not used" in line]
    assert lines == [f"train@mlp: checkpoint not used: {CHECKPOINT} is damaged (its state or tensors do not match "
                     "their digest); training from scratch"]
    assert "resuming from" not in text and "Traceback" not in text
    assert mlp_outs(repo) == reference[1]  # the clean run's bytes: no epoch skipped, no loss from the edited history


@pytest.mark.slow
def test_editing_the_checkpoint_settings_retrains_nothing(baseline: Path, tmp_path: Path) -> None:
    """Checkpoint settings are no stage's DVC params: only `params`, the check of the whole file, runs again."""
    repo = clone(baseline, tmp_path / "repo")
    set_params(repo, {"checkpoint.every_epochs": 7, "checkpoint.every_steps": 3, "checkpoint.min_seconds": 0.5})
    assert dvc(repo, "status", "--json").stdout.strip() == json.dumps({"params": [{"changed deps": {
        "params.yaml": {"checkpoint": "modified"}}}]})
    assert re.findall(r"Running stage '([^']+)'", output_of(dvc(repo, "repro"))) == ["params"]
    assert "up to date" in dvc(repo, "status").stdout
