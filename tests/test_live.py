"""A run you can watch while it trains (pipeline/tracking/live.py): curves, progress and system metrics reach MLflow
during training, progress lines reach a `dvc repro` that is no terminal, and the final curves are as without it.

One real `dvc repro train@mlp` is watched from this process (another process than the stage), SIGKILLed, and run
again: it resumes the same run. A third, live logging off, gives the curves to compare with.
"""

from __future__ import annotations

import io
import json
import os
import queue
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.tracking.live import LiveReport
from pipeline.training import Record
from tests.helpers import clone, dvc, output_of, running, set_params, stage_pids

# ~100 steps an epoch on the tiny data: several seconds of training, many 0.2 s flushes (a few epochs each); a
# checkpoint every 20 epochs, so the run is killed with points past the checkpoint (the rerun trains them again)
LIVE = {"mlp.epochs": 120, "mlp.patience": 200, "mlp.batch_size": 4, "mlflow.flush_seconds": 0.2,
        "mlflow.system_metrics_seconds": 1, "checkpoint.every_epochs": 20, "checkpoint.min_seconds": 0.0}
CURVES = ("train_loss", "val_loss")
PROGRESS = "train@mlp: epoch "


def client_of(repo: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def mlp_run(client: Any) -> Any:
    (run,) = [r for r in client.search_runs(["1"]) if r.data.tags.get("stage") == "train@mlp"]
    return run


def curves(client: Any, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Each curve's (step, value) points, in step order."""
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in CURVES}


def lines_of(stream: Any) -> queue.Queue[str]:
    """The lines `stream` prints, as they come (a thread reads them)."""
    found: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [found.put(line) for line in stream], daemon=True).start()
    return found


def past_the_checkpoint(repo: Path, sent: int) -> bool:
    """Whether the run holds points of epochs after the stage's last checkpoint, and the next checkpoint is still
    epochs away (so a kill now leaves sent points that the resumed run must not send again)."""
    path = repo / ".checkpoints" / "train@mlp.safetensors"
    try:
        raw = path.read_bytes()
        state = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]["state"]
        done = int(re.search(r'\["done", (\d+)\]', state)[1])  # type: ignore[index]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # none yet (or being replaced)
    return done + 2 < sent < done + LIVE["checkpoint.every_epochs"] - 8  # the kill lands epochs before the next


@pytest.mark.slow
def test_a_training_stage_is_watched_live_then_killed_and_resumed_to_the_curves_of_a_stage_not_live(
    baseline: Path, tmp_path: Path, spawn: Any, stage_start: str,
) -> None:
    repo = clone(baseline, tmp_path / "repo")
    set_params(repo, LIVE)
    repro = spawn([sys.executable, "-m", "dvc", "repro", "train@mlp"], repo)
    printed = lines_of(repro.stderr)
    deadline = time.monotonic() + 120
    while not running(repo, "train@mlp"):
        assert repro.poll() is None and time.monotonic() < deadline, "train@mlp never started its run"
        time.sleep(0.1)
    client = client_of(repo)
    run_id = mlp_run(client).info.run_id
    seen: dict[str, Any] = {"points": [], "system": False, "line": ""}
    while not (len(set(seen["points"])) > 1 and seen["system"] and seen["line"]
               and past_the_checkpoint(repo, seen["points"][-1])):
        assert repro.poll() is None, f"the stage ended before it was seen live: {seen} {repro.communicate()}"
        assert time.monotonic() < deadline, f"not seen live in 120 s: {seen}"
        run = client.get_run(run_id)
        assert run.info.status == "RUNNING"
        seen["points"].append(len(client.get_metric_history(run_id, "train_loss")))
        seen["system"] = any(k.startswith("system/cpu_") for k in run.data.metrics)
        while not printed.empty():
            if (line := printed.get()).startswith(PROGRESS):
                seen["line"] = line
        time.sleep(0.2)
    # done-when: the curve grew between reads, system metrics and a progress line came, all before the run ended
    assert seen["points"][0] < seen["points"][-1] and client.get_run(run_id).info.status == "RUNNING"
    assert int(client.get_run(run_id).data.tags["training.epochs_planned"]) == LIVE["mlp.epochs"]
    assert f"/{LIVE['mlp.epochs']}, val loss " in seen["line"] and "s left" in seen["line"], seen["line"]
    for pid in stage_pids(repo):
        os.kill(pid, signal.SIGKILL)
    repro.communicate(timeout=120)
    sent = {key: [m.step for m in client.get_metric_history(run_id, key)] for key in CURVES}

    resumed = output_of(dvc(repo, "repro", "train@mlp"))
    epoch = int(next(ln for ln in resumed.splitlines() if "train@mlp: resuming from" in ln).rsplit(" ", 1)[1])
    assert max(sent["train_loss"]) >= epoch, "nothing past the checkpoint was sent: the rerun's overlap is untested"
    run = mlp_run(client)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    got = curves(client, run_id)
    for key in CURVES:
        assert [s for s, _ in got[key]] == list(range(LIVE["mlp.epochs"])), f"{key}: not every step once"
    assert run.data.tags["training.epochs_done"] == str(LIVE["mlp.epochs"])

    quiet = clone(baseline, tmp_path / "not-live")
    set_params(quiet, LIVE | {"mlflow.flush_seconds": 0})
    dvc(quiet, "repro", "train@mlp")
    assert got == curves(client_of(quiet), mlp_run(client_of(quiet)).info.run_id)
    assert (quiet / "models/mlp.safetensors").read_bytes() == (repo / "models/mlp.safetensors").read_bytes()


class _Run:
    """What LiveReport calls on a StageRun, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def log_curve(self, key: str, steps: list[int], values: list[float]) -> None:
        self.calls.append((key, list(zip(steps, values))))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.calls.append(("tags", tags))

    def flush(self) -> None:
        self.calls.append(("flush", None))


def test_live_report_sends_every_flush_seconds_and_prints_lines_only_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 0.1, 0.3, 0.35])  # created, then three records
    monkeypatch.setattr("pipeline.tracking.live.time.monotonic", lambda: next(clock))
    run, out = _Run(), io.StringIO()
    live = LiveReport(run, "train@linear_gd", "step", 0.2, out)  # type: ignore[arg-type]
    for done in (10, 20, 30):
        live(Record(done, 40, list(range(done - 10, done)), [1.0] * 10, 0.5))
    assert [c[0] for c in run.calls].count("flush") == 1  # at 0.3 s only: 0.1 and 0.35 are under 0.2 s from a send
    assert ("tags", {"training.steps_done": 20, "training.steps_planned": 40}) in run.calls
    assert out.getvalue() == "train@linear_gd: step 20/40, val loss 0.5, 0 s, about 0 s left\n"
    sent = [p for key, points in run.calls if key == "train_loss" for p in points]
    assert [s for s, _ in sent] == list(range(30))  # linear_gd: every step, not only the recorded ones

    tty = io.StringIO()
    tty.isatty = lambda: True  # type: ignore[method-assign]
    clock = iter([0.0, 10.0])
    off = LiveReport(_Run(), "train@mlp", "epoch", 0.0, tty)  # type: ignore[arg-type]
    off(Record(1, 5, [0], [1.0], 0.5))
    assert tty.getvalue() == "" and off.run.calls == []  # type: ignore[attr-defined]
