"""A disk that fills up while a stage writes: its data, its outputs, or the spool its run moves to.

Each case mounts a small tmpfs where the stage writes, in a copy of the session's reproduced tiny project
whose stages log to one real `mlflow server` behind a FaultProxy. The proxy fills the tmpfs with a ballast
file when the stage opens its run (after generate's size check, before any output is written), or fails
the store so the run moves to a spool on a full disk. Every case: one line on stderr naming the file and
the cause, no traceback; the stage's outputs all written or none (the old ones untouched); the run closed
FAILED with its true reason; no half spool entry, and `./tasks.sh sync` says what it found.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.files import md5_file
from tests.helpers import (
    SYNC, FaultProxy, clone, fill_disk, proxied_server, run_env, set_params, sh, stray_temp_files, tmpfs,
)

pytestmark = pytest.mark.slow

PAGE = 4096  # tmpfs counts space in pages
TRAIN_OUTS = ("models/linear_gd.safetensors", "plots/loss/linear_gd.csv", "plots/loss/linear_gd.png",
              "metrics/train/linear_gd.json")
DATA_OUTS = ("data/train.parquet", "data/val.parquet", "data/test.parquet", "data/truth.json")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultProxy]:
    """One real `mlflow server` for the module, behind a FaultProxy (healed after each test)."""
    with proxied_server(tmp_path_factory.mktemp("disk-server")) as front:
        yield front


def workspace(baseline: Path, dest: Path, experiment: str) -> Path:
    """A copy of the reproduced project whose stages log to `experiment`."""
    repo = clone(baseline, dest)
    set_params(repo, {"mlflow.experiment": experiment})
    return repo


def stage(repo: Path, proxy: FaultProxy, name: str) -> subprocess.CompletedProcess[str]:
    """`python -m stages …` by hand against the proxy (no HTTP retries); the line saying it ran by hand left out."""
    env = run_env(MLFLOW_TRACKING_URI=proxy.url, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="60")
    proc = sh(repo, sys.executable, "-m", "stages", *name.split("@"), check=False, env=env)
    proc.stderr = "".join(ln for ln in proc.stderr.splitlines(keepends=True) if not ln.startswith(f"{name}: run by hand"))
    return proc


def sync(repo: Path, proxy: FaultProxy) -> subprocess.CompletedProcess[str]:
    """`./tasks.sh sync` without its install step."""
    return sh(repo, *SYNC, check=False, env=run_env(MLFLOW_TRACKING_URI=proxy.url))


def digests(repo: Path, rels: tuple[str, ...]) -> dict[str, str]:
    return {rel: md5_file(repo / rel) for rel in rels}


def runs_of(proxy: FaultProxy, experiment: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(proxy.url)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def assert_one_line(proc: subprocess.CompletedProcess[str], name: str, *says: str) -> str:
    """Exit 1, one line on stderr starting with the stage's name and saying each of `says`, no traceback."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert lines[0].startswith(f"{name}: ") and all(s in lines[0] for s in says), lines[0]
    return lines[0]


def fills_at_run_start(folder: Path, leave: int) -> tuple[Any, Any]:
    """FaultProxy.before arguments: when the stage creates its run, fill `folder`'s disk to `leave` bytes free."""
    return (lambda method, path, body: path.endswith("/runs/create")), (lambda: fill_disk(folder, leave))


def test_generate_on_a_disk_that_fills_up(baseline: Path, proxy: FaultProxy, tmp_path: Path) -> None:
    """data/ is a tmpfs with room for generate's size check; it fills as the run opens, leaving room for the train
    split only: one line naming the split that did not fit, the old data untouched, the run FAILED, no spool."""
    repo = workspace(baseline, tmp_path / "repo", "disk-generate")
    old = digests(repo, DATA_OUTS)
    saved = tmp_path / "data-saved"
    shutil.copytree(repo / "data", saved)
    with tmpfs(repo / "data", "256k"):
        shutil.copytree(saved, repo / "data", dirs_exist_ok=True)
        room = -(-(repo / "data" / "train.parquet").stat().st_size // PAGE) * PAGE + PAGE  # train fits, val does not
        proxy.before(*fills_at_run_start(repo / "data", room))
        try:
            proc = stage(repo, proxy, "generate")
        finally:
            proxy.heal()
        line = assert_one_line(proc, "generate", "no space left on device (ENOSPC)", "nothing was published")
        assert line.startswith(("generate: data/val.parquet:", "generate: data/test.parquet:")), line
        assert digests(repo, DATA_OUTS) == old
        assert not stray_temp_files(repo)
    (run,) = runs_of(proxy, "disk-generate")
    assert run.info.status == "FAILED" and "no space left on device" in run.data.tags.get("closed.reason", ""), run
    assert not (repo / ".mlflow-spool").exists()


def test_a_train_stage_whose_outputs_fill_the_disk(baseline: Path, proxy: FaultProxy, tmp_path: Path) -> None:
    """models/, plots/ and metrics/ live on one tmpfs that fills as the run opens, leaving two pages: the weights
    and the loss CSV fit, the picture does not. One line naming it; none of the four outputs is new; the run FAILED."""
    repo = workspace(baseline, tmp_path / "repo", "disk-train")
    old = digests(repo, TRAIN_OUTS)
    with tmpfs(tmp_path / "outs", "1m") as outs:
        for folder in ("models", "plots", "metrics"):  # the outputs' folders, moved onto the small disk
            shutil.move(repo / folder, outs / folder)
            (repo / folder).symlink_to(outs / folder)
        try:
            proxy.before(*fills_at_run_start(outs, 2 * PAGE))
            try:
                proc = stage(repo, proxy, "train@linear_gd")
            finally:
                proxy.heal()
            line = assert_one_line(proc, "train@linear_gd", "no space left on device (ENOSPC)", "nothing was published")
            assert line.startswith("train@linear_gd: plots/loss/linear_gd.png:"), line
            assert digests(repo, TRAIN_OUTS) == old
            assert not stray_temp_files(outs)
        finally:
            for folder in ("models", "plots", "metrics"):
                (repo / folder).unlink()
    (run,) = runs_of(proxy, "disk-train")
    assert run.info.status == "FAILED" and "linear_gd.png" in run.data.tags.get("closed.reason", ""), run
    assert not (repo / ".mlflow-spool").exists()


def test_a_spool_on_a_full_disk(baseline: Path, proxy: FaultProxy, tmp_path: Path) -> None:
    """The store fails after the run began (503 on its params), and .mlflow-spool/ is a tmpfs too small for a spool:
    one line naming spool.db and the cause; no output written; no half spool entry, only a note of the run's end,
    which sync replays (the run closes FAILED with the true reason). A damaged entry is reported by sync, and kept."""
    repo = workspace(baseline, tmp_path / "repo", "disk-spool")
    old = digests(repo, TRAIN_OUTS)
    with tmpfs(tmp_path / "spool", "64k") as small:
        (repo / ".mlflow-spool").symlink_to(small)
        proxy.fail_when(lambda method, path, body: path.endswith("/runs/log-batch") and b'"params"' in body)
        try:
            proc = stage(repo, proxy, "train@linear_gd")
        finally:
            proxy.heal()
        line = assert_one_line(proc, "train@linear_gd", "the MLflow store failed (HTTP 503)",
                               "spool.db: database or disk is full", "./tasks.sh sync")
        print(f"\n{line}")
        assert digests(repo, TRAIN_OUTS) == old and not stray_temp_files(repo)
        (run,) = runs_of(proxy, "disk-spool")
        assert run.info.status == "RUNNING" and run.info.run_id in line  # the store was down: sync closes it
        entries = sorted(p.name for p in small.iterdir())
        assert len(entries) == 1 and [p.name for p in (small / entries[0]).iterdir()] == ["meta.json"], entries

        damaged = small / "20000101-000000-train-linear-99999999"  # left by a stage killed while opening its spool
        damaged.mkdir()
        (damaged / "spool.db").write_bytes(b"")
        synced = sync(repo, proxy)
        assert synced.returncode == 1 and "Traceback" not in synced.stderr, synced.stderr
        assert f"run {run.info.run_id} closed as FAILED" in synced.stdout, synced.stdout
        (complaint,) = synced.stderr.splitlines()
        assert complaint.startswith(f"sync: .mlflow-spool/{damaged.name} is damaged (no meta.json"), complaint
        assert sorted(p.name for p in small.iterdir()) == [damaged.name]
        (repo / ".mlflow-spool").unlink()
    (run,) = runs_of(proxy, "disk-spool")
    reason = run.data.tags.get("closed.reason", "")
    assert run.info.status == "FAILED" and "database or disk is full" in reason and "HTTP 503" in reason, reason


def test_a_spool_whose_disk_fills_after_it_opened(baseline: Path, proxy: FaultProxy, tmp_path: Path) -> None:
    """The store fails after the run began (503 on its params) and the spool opens, but its disk fills while the
    rest of the run is written there: one line naming the cause, no traceback; the half-kept run removed (sync
    would replay a run cut short), only a note of the run's end kept, which sync replays (FAILED, the true reason)."""
    repo = workspace(baseline, tmp_path / "repo", "disk-spool-late")
    old = digests(repo, TRAIN_OUTS)
    with tmpfs(tmp_path / "spool", "8m") as small:
        (repo / ".mlflow-spool").symlink_to(small)
        opened = threading.Event()

        def fill_once_open() -> None:  # the spool is whole once its meta.json is written (last): then the disk fills
            while not opened.is_set():
                if list(small.glob("*/meta.json")):
                    fill_disk(small, 0)
                    opened.set()
                time.sleep(0.005)

        watcher = threading.Thread(target=fill_once_open, daemon=True)
        watcher.start()
        proxy.fail_when(lambda method, path, body: path.endswith("/runs/log-batch") and b'"params"' in body)
        try:
            proc = stage(repo, proxy, "train@linear_gd")
        finally:
            proxy.heal()
            opened.set()
            watcher.join()
        (small / ".ballast").unlink(missing_ok=True)  # room again, for sync's work below (absent if the spool never opened)
        line = assert_one_line(proc, "train@linear_gd", "the MLflow store failed (HTTP 503)",
                               "the spool failed while it kept the run (", "so the part kept there was removed",
                               "./tasks.sh sync", "free some space")
        print(f"\n{line}")
        assert digests(repo, TRAIN_OUTS) == old and not stray_temp_files(repo)
        (run,) = runs_of(proxy, "disk-spool-late")
        assert run.info.status == "RUNNING" and run.info.run_id in line
        (entry,) = small.iterdir()
        assert [p.name for p in entry.iterdir()] == ["meta.json"], entry  # the note of the end, nothing half-kept
        synced = sync(repo, proxy)
        assert synced.returncode == 0 and f"run {run.info.run_id} closed as FAILED" in synced.stdout, synced.stdout
        assert not list(small.iterdir())
        (repo / ".mlflow-spool").unlink()
    (run,) = runs_of(proxy, "disk-spool-late")
    reason = run.data.tags.get("closed.reason", "")
    assert run.info.status == "FAILED" and "the spool failed while it kept the run" in reason and "HTTP 503" in reason
