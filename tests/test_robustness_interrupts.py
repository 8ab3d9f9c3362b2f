"""Runs that end early: divergence, Ctrl-C and SIGTERM, an interrupted atomic write.

Set-up shared by tests/test_robustness_*.py: tests/helpers.py, and the `baseline` fixture in tests/conftest.py.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline.files import atomic_path
from tests.helpers import (
    TINY, assert_untouched, clone, dvc, output_of, outputs, runs, set_params, stage_pid, statuses, stray_temp_files, suite_env,
    wait_for_checkpoint,
)


# ---------------------------------------------------------------- divergence


@pytest.mark.slow
def test_divergence_fails_the_run_with_its_curve_and_writes_no_model(baseline: Path, tmp_path: Path) -> None:
    repo = clone(baseline, tmp_path / "repo")
    before, lock = outputs(repo), (repo / "dvc.lock").read_bytes()
    set_params(repo, {"linear_gd.lr": 10.0})
    proc = dvc(repo, "repro", check=False)
    text = output_of(proc)
    assert proc.returncode != 0 and "Traceback" not in text
    line = next(line for line in text.splitlines() if line.startswith("train@linear_gd: "))
    assert "training diverged: the loss became inf at step" in line
    assert "try a smaller linear_gd.lr (now 10, e.g. 1). No model was written." in line
    assert not (repo / "models" / "linear_gd.safetensors").exists()
    assert_untouched(repo, before, lock)

    from mlflow.tracking import MlflowClient

    (run,) = runs(repo)
    assert (run.data.tags["stage"], run.info.status) == ("train@linear_gd", "FAILED")
    curve = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_metric_history(run.info.run_id, "train_loss")
    step = int(line.split("at step ")[1].split(";")[0])
    assert curve and max(m.step for m in curve) < step  # the curve up to the step that blew up
    assert all(m.value == m.value and abs(m.value) < float("inf") for m in curve)


# ---------------------------------------------------------------- interruptions


@pytest.mark.slow
@pytest.mark.parametrize("stage_start", ["warm", "cold"], indirect=True)
def test_interrupted_stage_is_killed_and_next_repro_completes(
    baseline: Path, tmp_path: Path, spawn: Any, stage_start: str,
) -> None:
    """SIGINT to a stage run by hand, then SIGTERM to a stage under `dvc repro`; then `dvc repro` completes."""
    repo = clone(baseline, tmp_path / "repo")
    before, lock = outputs(repo), (repo / "dvc.lock").read_bytes()
    # (the upper bound) minutes of training: it is stopped long before; a checkpoint every 100 steps
    # shows when the loop runs (checkpoint settings are no DVC params: nothing reruns for them)
    set_params(repo, {"linear_gd.steps": 1_000_000, "checkpoint.min_seconds": 0.0})

    by_hand = spawn([sys.executable, "-m", "stages", "train", "linear_gd"], repo)
    wait_for_checkpoint(repo, "train@linear_gd", by_hand)
    by_hand.send_signal(signal.SIGINT)
    out, err = by_hand.communicate(timeout=120)
    assert by_hand.returncode == 130
    assert "train@linear_gd: interrupted (Ctrl-C; checkpoint after step " in err and "Traceback" not in err
    assert "the next run resumes from it); no output was written" in err
    assert statuses(repo) == {"train@linear_gd": ["KILLED"]}
    assert_untouched(repo, before, lock)

    saved = (repo / ".checkpoints" / "train@linear_gd.safetensors").stat().st_mtime
    repro = spawn([sys.executable, "-m", "dvc", "repro"], repo)
    wait_for_checkpoint(repo, "train@linear_gd", repro, newer_than=saved)
    pid = stage_pid(repo, "linear_gd")
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    out, err = repro.communicate(timeout=120)
    assert repro.returncode != 0
    assert "train@linear_gd: resuming from .checkpoints/train@linear_gd.safetensors after step " in out + err
    assert "train@linear_gd: interrupted (stopped by signal SIGTERM; checkpoint after step " in out + err
    assert "exited with 130" in out + err
    assert statuses(repo) == {"train@linear_gd": ["KILLED"]}  # the by-hand run, resumed, killed again
    assert not (repo / "models" / "linear_gd.safetensors").exists()  # DVC removed it; nothing half-written replaced it
    assert_untouched(repo, before, lock)

    set_params(repo, {"linear_gd.steps": TINY["linear_gd.steps"] + 10})
    dvc(repo, "repro", env=suite_env())  # the repro after the interruptions, started as the suite's are
    assert "up to date" in dvc(repo, "status", env=suite_env()).stdout
    final = statuses(repo)
    assert final["train@linear_gd"] == ["KILLED", "FINISHED"]  # other params: the checkpoint was not used
    assert final["evaluate"] == ["FINISHED"]
    assert not stray_temp_files(repo)


def test_atomic_write_interrupted_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]
