"""Hard to break: bad params and data, divergence, interruptions, store faults, bit-for-bit reruns, safe weights.

The `slow` tests run the real thing: `dvc repro` in a throwaway git+DVC repository, the
stage entry points as subprocesses, and a real MLflow SQLite store. One baseline repository
is reproduced once per module (tiny params, secrets in the environment, a git remote with a
token in its URL); each test works on its own copy of it, with a fresh MLflow store.
The bad-data cases call the readers in-process on files written by the real generator.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import TINY, copy_project, dvc, run_env, set_params, sh
from pipeline import data
from pipeline.files import atomic_path, md5_file

SECRETS = {"API_TOKEN": "tok-5ecret-never-logged", "DB_PASSWORD": "pw-5ecret-never-logged"}
REMOTE_TOKEN = "ghp-5ecret-in-the-remote-url"
N_TRAIN = 420  # train rows under TINY's data.n_samples = 600


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reproduced tiny project, committed; secrets were in the environment of every stage."""
    repo = copy_project(tmp_path_factory.mktemp("baseline") / "repo")
    sh(repo, "git", "remote", "add", "origin", f"https://ci:{REMOTE_TOKEN}@example.invalid/team/pipeline.git")
    dvc(repo, "repro", env=run_env(**SECRETS))
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline run")
    return repo


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/{train,val,test}.parquet and truth.json as the generate stage writes them (in-process, tiny)."""
    folder = tmp_path_factory.mktemp("tiny") / "data"
    truth = data.generate(
        folder, seed=0, n_samples=600, n_features=10, noise_std=1.0, nonlinearity=1.0,
        rows={"train": N_TRAIN, "val": 90, "test": 90},
    )
    (folder / "truth.json").write_text(json.dumps(truth.to_dict()))
    return folder


def clone(baseline: Path, dest: Path) -> Path:
    """A copy of the baseline (git, DVC cache, outputs) with no MLflow store yet."""
    shutil.copytree(
        baseline, dest, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db", "mlflow.db.lock", "mlartifacts")
    )
    return dest


def outputs(repo: Path) -> dict[str, str]:
    """md5 of every file under every output dvc.lock lists (folders walked); absent files are left out."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    found: dict[str, str] = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            path = repo / out["path"]
            files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else []
            found |= {str(f.relative_to(repo)): md5_file(f) for f in files}
    return found


def stray_temp_files(repo: Path) -> list[Path]:
    """Half-written outputs (atomic_path's temp files) anywhere outside .git and .dvc."""
    return [p for p in repo.rglob(".*.tmp") if not {".git", ".dvc"} & set(p.relative_to(repo).parts)]


def assert_untouched(repo: Path, before: dict[str, str], lock: bytes, changed: tuple[str, ...] = ()) -> None:
    """dvc.lock is byte-identical; every output is either gone (DVC removed it) or has its old bytes."""
    assert (repo / "dvc.lock").read_bytes() == lock, "dvc.lock changed"
    now = outputs(repo)
    new = {k: v for k, v in now.items() if k not in changed and before.get(k) != v}
    assert not new, f"outputs with new content: {sorted(new)}"
    assert not stray_temp_files(repo)


def runs(repo: Path) -> list[Any]:
    """Every run in the repository's MLflow store (none when the store was never created)."""
    db = repo / "mlflow.db"
    if not db.exists():
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def statuses(repo: Path) -> dict[str, list[str]]:
    """{stage tag: [statuses, oldest first]}."""
    out: dict[str, list[str]] = {}
    for run in sorted(runs(repo), key=lambda r: r.info.start_time):
        out.setdefault(run.data.tags.get("stage", "?"), []).append(run.info.status)
    return out


def output_of(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_pid(repo: Path, model: str) -> int | None:
    """The pid of `python -m stages.train <model>` running in `repo`, if any."""
    wanted = f"stages.train\0{model}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if wanted in (proc / "cmdline").read_bytes() and (proc / "cwd").resolve() == repo.resolve():
                return int(proc.name)
        except OSError:
            continue
    return None


@pytest.fixture
def spawn() -> Iterator[Any]:
    """Start background commands in their own process group; whatever is left is killed after the test."""
    started: list[subprocess.Popen[str]] = []

    def start(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or run_env(), text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the group: a killed `dvc` would orphan its stage
            proc.communicate()


def _running(repo: Path, stage: str) -> bool:
    """Whether `stage` has a RUNNING run, read-only (the poller must not create the store the stage is creating)."""
    db = repo / "mlflow.db"
    if not db.exists():
        return False
    query = "SELECT r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid WHERE t.key = 'stage' AND t.value = ?"
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as con:
            return ("RUNNING",) in con.execute(query, (stage,)).fetchall()
    except sqlite3.OperationalError:  # tables not created yet, or busy
        return False


def wait_for_running(repo: Path, stage: str, proc: subprocess.Popen[str], limit: float = 300) -> None:
    """Poll the store until `stage` has a RUNNING run (the stage is past set-up, into training)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ended early with {proc.returncode}: {proc.communicate()}"
        if _running(repo, stage):
            return
        time.sleep(0.5)
    raise AssertionError(f"{stage} never reached a RUNNING MLflow run")


# ---------------------------------------------------------------- bad params through the real `dvc repro`

DELETE = object()
MALFORMED = object()

# (key, bad value, the line the user sees): one per stage and kind of check (the full list of schema
# cases runs in-process in test_config.py); all in one repository, params reset between cases
E2E_PARAMS: list[tuple[str, Any, str]] = [
    ("mlp.lrr", 0.1, "train@mlp: invalid params.yaml: mlp.lrr: unknown key (did you mean 'lr'?); allowed in mlp: hidden,"),
    ("linear.epochs", "ten", "train@linear: invalid params.yaml: linear.epochs: got 'ten'; must be a valid integer"),
    ("data.split.train", 0.5, "generate: invalid params.yaml: data.split: got train 0.5 + val 0.15 + test 0.15 = 0.8; the fractions must sum to 1"),
    ("linear.batch_size", 10_000, f"train@linear: invalid params.yaml: linear.batch_size: got 10000; must be at most {N_TRAIN}, the rows in the train split"),
    ("evaluate.plot_points", 0, "evaluate: invalid params.yaml: evaluate.plot_points: got 0; must be greater than 0"),
    # caught by DVC itself, before any stage runs, naming the key or the file and line
    ("linear_gd", DELETE, "Parameters 'linear_gd' are missing from 'params.yaml'"),
    ("mlp", MALFORMED, "unable to read: 'params.yaml', YAML file structure is corrupted"),
]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.slow
@pytest.mark.bad_input
def test_bad_params_stop_dvc_repro_cleanly(baseline: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Each case: non-zero exit, its one line, no traceback, dvc.lock and outputs untouched, no MLflow run."""
    repo = clone(baseline, tmp_path / "repo")
    cases = list(E2E_PARAMS)
    if not _cuda():
        cases.append(("device", "cuda", "train@linear_gd: device: got 'cuda', but this machine has no CUDA device; allowed here: auto, cpu"))
    request.node.user_properties.append(("bad_input_cases", len(cases)))
    good = (repo / "params.yaml").read_text()
    before, lock = outputs(repo), (repo / "dvc.lock").read_bytes()
    for key, value, expected in cases:
        if value is MALFORMED:
            (repo / "params.yaml").write_text(good.replace("mlp:\n", "mlp: {lr: [0.1\n", 1))
        elif value is DELETE:
            params = yaml.safe_load(good)
            del params[key]
            (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        else:
            set_params(repo, {key: value})
        proc = dvc(repo, "repro", check=False)
        text = output_of(proc)
        assert proc.returncode != 0, f"{key}: dvc repro succeeded"
        assert expected in text, f"{key}: expected {expected!r} in\n{text}"
        assert "Traceback" not in text
        assert sum("invalid params.yaml" in line for line in text.splitlines()) <= 1
        assert_untouched(repo, before, lock)
        assert runs(repo) == [], f"{key}: an MLflow run was started"
        (repo / "params.yaml").write_text(good)
    dvc(repo, "checkout")  # DVC removed the failed stages' outputs before running them; its cache has them
    assert outputs(repo) == before
    assert "up to date" in dvc(repo, "status").stdout


# ---------------------------------------------------------------- bad data


def _split_file(tiny_data: Path, tmp_path: Path, split: str = "train") -> Path:
    dest = tmp_path / "data" / f"{split}.parquet"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_data / f"{split}.parquet", dest)
    return dest


def _rewrite(path: Path, change: Any) -> None:
    table = pq.read_table(path)
    pq.write_table(change(table), path)


BAD_DATA: list[tuple[str, Any, str]] = [
    ("missing", lambda p: p.unlink(), "train.parquet: missing; run `dvc repro generate`"),
    ("empty-file", lambda p: p.write_bytes(b""), "train.parquet: not a readable Parquet file"),
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "train.parquet: not a readable Parquet file ("),
    ("renamed-column", lambda p: _rewrite(p, lambda t: t.rename_columns([*t.column_names[:-1], "target"])),
     "train.parquet: missing column(s) y; unexpected column(s) target; expected columns x0..x9 and y, all float32"),
    ("float64-column", lambda p: _rewrite(p, lambda t: t.set_column(0, "x0", t.column(0).cast(pa.float64()))),
     "train.parquet: x0 is double; expected columns x0..x9 and y"),
    ("extra-column", lambda p: _rewrite(p, lambda t: t.append_column("x10", t.column(0))),
     "train.parquet: unexpected column(s) x10"),
    ("dropped-feature", lambda p: _rewrite(p, lambda t: t.drop_columns(["x9"])), "train.parquet: missing column(s) x9"),
    ("reordered", lambda p: _rewrite(p, lambda t: t.select(["y", *t.column_names[:-1]])), "train.parquet: columns in the wrong order (y, x0"),
    ("nulls", lambda p: _rewrite(p, lambda t: t.set_column(3, "x3", pa.array([None] * t.num_rows, pa.float32()))),
     "train.parquet: missing values in {'x3': 420}"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("name", "damage", "expected"), BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_split_file_is_named(tiny_data: Path, tmp_path: Path, name: str, damage: Any, expected: str) -> None:
    path = _split_file(tiny_data, tmp_path)
    damage(path)
    with pytest.raises(data.DataError) as err:
        data.read_split(path, 10)
    assert expected in str(err.value) and str(path) in str(err.value)


def _truth(tiny_data: Path) -> dict[str, Any]:
    return json.loads((tiny_data / "truth.json").read_text())


BAD_TRUTH: list[tuple[str, Any, str]] = [
    ("not-json", "{\"w_true\": [1.0,", "truth.json: not valid JSON"),
    ("not-an-object", [1, 2], "truth.json: not a valid truth file: expected a JSON object, got list"),
    ("lacks-key", lambda t: {k: v for k, v in t.items() if k != "rows"}, "truth.json: not a valid truth file: lacks ['rows']"),
    ("short-w_true", lambda t: t | {"w_true": t["w_true"][:3]}, "truth.json: not a valid truth file: w_true has 3 entries but n_features is 10"),
    ("bad-rows", lambda t: t | {"rows": {"train": 420}}, "truth.json: not a valid truth file: rows is {'train': 420}"),
    ("bad-n_features", lambda t: t | {"n_features": "ten"}, "truth.json: not a valid truth file: n_features is 'ten'"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("name", "edit", "expected"), BAD_TRUTH, ids=[c[0] for c in BAD_TRUTH])
def test_bad_truth_file_is_named(tiny_data: Path, tmp_path: Path, name: str, edit: Any, expected: str) -> None:
    path = tmp_path / "truth.json"
    if isinstance(edit, str):
        path.write_text(edit)
    else:
        path.write_text(json.dumps(edit(_truth(tiny_data)) if callable(edit) else edit))
    with pytest.raises(data.DataError) as err:
        data.read_truth(path)
    assert expected in str(err.value) and str(path) in str(err.value)
    assert "rerun `dvc repro generate`" in str(err.value) or "not a valid truth file: expected" in str(err.value)


@pytest.mark.bad_input
@pytest.mark.parametrize("change", ["rows", "n_features"])
def test_truth_that_does_not_match_the_data(tiny_data: Path, tmp_path: Path, change: str) -> None:
    raw = _truth(tiny_data)
    if change == "rows":
        raw["rows"]["train"] += 1
        expected = f"has {N_TRAIN} rows x 10 features, but truth.json says {N_TRAIN + 1} x 10"
    else:
        raw = raw | {"n_features": 11, "w_true": raw["w_true"] + [0.0]}
        expected = "missing column(s) x10"
    truth = data.Truth.from_dict(raw)
    path = _split_file(tiny_data, tmp_path)
    with pytest.raises(data.DataError) as err:
        X, _ = data.read_split(path, truth.n_features)
        data.check_consistent(truth, "train", X, path)
    assert expected in str(err.value) and str(path) in str(err.value)


@pytest.mark.bad_input
@pytest.mark.parametrize("damage", ["truncated", "not-safetensors"])
def test_damaged_weights_are_named(tmp_path: Path, damage: str) -> None:
    import numpy as np

    from pipeline import models
    from stages.evaluate import _predict

    path = tmp_path / "mlp.safetensors"
    spec = {"kind": "mlp", "n_features": 10, "hidden": [8], "activation": "relu", "dropout": 0.0}
    models.save_weights(models.build(spec), spec, path)
    raw = path.read_bytes()
    assert _predict(path, np.zeros((2, 10), np.float32))[0].shape == (2,)  # intact, it loads
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"PK\x03\x04 a zip, say")
    with pytest.raises(data.DataError, match="not a weights file this pipeline wrote") as err:
        _predict(path, np.zeros((2, 10), np.float32))
    assert str(path) in str(err.value)


@pytest.mark.slow
@pytest.mark.bad_input
def test_damaged_data_stops_the_stage_and_repro_repairs_it(baseline: Path, tmp_path: Path) -> None:
    """Through DVC: the train stage names the file, starts no run, writes nothing; `dvc repro` restores the data."""
    repo = clone(baseline, tmp_path / "repo")
    before, lock = outputs(repo), (repo / "dvc.lock").read_bytes()
    train = repo / "data" / "train.parquet"
    train.write_bytes(train.read_bytes()[:500])
    proc = dvc(repo, "repro", "--single-item", "train@linear", check=False)
    text = output_of(proc)
    assert proc.returncode != 0
    assert "train@linear: data/train.parquet: not a readable Parquet file" in text and "Traceback" not in text
    assert_untouched(repo, before, lock, changed=("data/train.parquet",))
    assert runs(repo) == []
    dvc(repo, "repro")
    assert outputs(repo) == before


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
def test_interrupted_stage_is_killed_and_next_repro_completes(baseline: Path, tmp_path: Path, spawn: Any) -> None:
    """SIGINT to a stage run by hand, then SIGTERM to a stage under `dvc repro`; then `dvc repro` completes."""
    repo = clone(baseline, tmp_path / "repo")
    before, lock = outputs(repo), (repo / "dvc.lock").read_bytes()
    set_params(repo, {"linear_gd.steps": 5_000_000})  # minutes of training: it is stopped long before

    by_hand = spawn([sys.executable, "-m", "stages.train", "linear_gd"], repo)
    wait_for_running(repo, "train@linear_gd", by_hand)
    by_hand.send_signal(signal.SIGINT)
    out, err = by_hand.communicate(timeout=120)
    assert by_hand.returncode == 130
    assert "train@linear_gd: interrupted (Ctrl-C); no output was written" in err and "Traceback" not in err
    assert statuses(repo) == {"train@linear_gd": ["KILLED"]}
    assert_untouched(repo, before, lock)

    repro = spawn([sys.executable, "-m", "dvc", "repro"], repo)
    wait_for_running(repo, "train@linear_gd", repro)
    pid = stage_pid(repo, "linear_gd")
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    out, err = repro.communicate(timeout=120)
    assert repro.returncode != 0
    assert "train@linear_gd: interrupted (stopped by signal SIGTERM); no output was written" in out + err
    assert "exited with 130" in out + err
    assert statuses(repo) == {"train@linear_gd": ["KILLED", "KILLED"]}
    assert not (repo / "models" / "linear_gd.safetensors").exists()  # DVC removed it; nothing half-written replaced it
    assert_untouched(repo, before, lock)

    set_params(repo, {"linear_gd.steps": TINY["linear_gd.steps"] + 10})
    dvc(repo, "repro")
    assert "up to date" in dvc(repo, "status").stdout
    final = statuses(repo)
    assert final["train@linear_gd"] == ["KILLED", "KILLED", "FINISHED"]
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


# ---------------------------------------------------------------- the MLflow store


@pytest.mark.slow
@pytest.mark.bad_input
def test_tracking_server_down_fails_fast_before_any_work(baseline: Path, tmp_path: Path) -> None:
    repo = clone(baseline, tmp_path / "repo")
    before, lock = outputs(repo), (repo / "dvc.lock").read_bytes()
    uri = f"http://127.0.0.1:{closed_port()}"
    expected = f"train@linear: MLflow tracking server at {uri} is not reachable ("
    set_params(repo, {"linear.epochs": 3})
    start = time.monotonic()
    proc = dvc(repo, "repro", check=False, env=run_env(MLFLOW_TRACKING_URI=uri))
    seconds = time.monotonic() - start
    text = output_of(proc)
    assert proc.returncode != 0
    assert expected in text and "unset MLFLOW_TRACKING_URI to use the local store" in text and "Traceback" not in text
    assert_untouched(repo, before, lock)
    assert not (repo / "mlflow.db").exists()
    print(f"\nserver down: `dvc repro` gave up after {seconds:.1f} s (generate up to date, train@linear stopped)")

    # The check comes before the data is read: with the data gone, the store is still what is reported.
    (repo / "data" / "train.parquet").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "stages.train", "linear"], cwd=repo, env=run_env(MLFLOW_TRACKING_URI=uri),
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1 and expected in proc.stderr and "parquet" not in proc.stderr


@pytest.mark.slow
@pytest.mark.bad_input
@pytest.mark.skipif("__import__('torch').cuda.is_available()", reason="this machine has CUDA")
def test_cuda_without_cuda_fails_before_store_and_data(baseline: Path, tmp_path: Path) -> None:
    """`device: cuda` is checked right after torch is imported: before mlflow, the store and the data."""
    repo = clone(baseline, tmp_path / "repo")
    set_params(repo, {"device": "cuda"})
    (repo / "data" / "train.parquet").unlink()
    env = run_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{closed_port()}", PYTHONPROFILEIMPORTTIME="1")
    proc = subprocess.run(
        [sys.executable, "-m", "stages.train", "mlp"], cwd=repo, env=env, capture_output=True, text=True, timeout=300,
    )
    messages = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 1
    assert messages == ["train@mlp: device: got 'cuda', but this machine has no CUDA device; allowed here: auto, cpu"]
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and "mlflow" not in imported


WORKER = """
import sys, time
from pathlib import Path
from pipeline import tracking
print("ready", flush=True)
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.005)
with tracking.stage_run("worker", "regression", f"worker {sys.argv[2]}", {"worker": sys.argv[2]}) as run:
    run.log_params({"worker": sys.argv[2]})
    run.log_metrics({"value": float(sys.argv[2])})
"""


@pytest.mark.slow
def test_many_stages_starting_at_once_on_a_fresh_store(tmp_path: Path, spawn: Any) -> None:
    """Three processes open a store that does not exist yet at the same instant: all runs land, one experiment."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    go = tmp_path / "go"
    env = run_env(PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    workers = [spawn([sys.executable, "-c", WORKER, str(go), str(i)], tmp_path, env) for i in range(3)]
    for w in workers:  # every worker has imported mlflow and waits: then they all start together
        assert w.stdout.readline().strip() == "ready"
    assert not (tmp_path / "mlflow.db").exists()
    go.touch()
    for w in workers:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "regression"]
    found = client.search_runs([exp.experiment_id])
    assert sorted(r.data.params["worker"] for r in found) == [str(i) for i in range(3)]
    assert {r.info.status for r in found} == {"FINISHED"}


# ---------------------------------------------------------------- bit-for-bit reruns


@pytest.mark.slow
def test_forced_rerun_is_bit_for_bit(baseline: Path, tmp_path: Path) -> None:
    repo = clone(baseline, tmp_path / "repo")
    dvc(repo, "repro", "--force")
    assert (repo / "dvc.lock").read_bytes() == (baseline / "dvc.lock").read_bytes()
    for rel in [*(f"data/{s}.parquet" for s in data.SPLITS), *(f"models/{m}.safetensors" for m in ("linear_gd", "linear", "mlp"))]:
        assert md5_file(repo / rel) == md5_file(baseline / rel), rel
    assert statuses(repo).keys() == {"generate", "train@linear_gd", "train@linear", "train@mlp", "evaluate"}


# ---------------------------------------------------------------- safe weights, no secrets


@pytest.mark.slow
def test_weights_load_without_unpickling(baseline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    import torch
    from safetensors import safe_open

    from pipeline import models

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("unpickling was attempted")

    for name in ("linear_gd", "linear", "mlp"):
        raw = (baseline / "models" / f"{name}.safetensors").read_bytes()
        (size,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header length, JSON header, raw tensor bytes
        header = json.loads(raw[8 : 8 + size])
        assert "spec" in header["__metadata__"]
        with safe_open(str(baseline / "models" / f"{name}.safetensors"), framework="pt") as fh:
            assert set(fh.keys()) == {k for k in header if k != "__metadata__"}
    with monkeypatch.context() as m:
        for target, attr in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
            m.setattr(target, attr, refuse)
        model, spec = models.load_weights(baseline / "models" / "mlp.safetensors")
    assert spec["kind"] == "mlp" and torch.isfinite(model(torch.ones(2, 10))).all()


@pytest.mark.slow
def test_logged_models_are_pt2_and_load_with_pickle_disallowed(baseline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.pytorch
    import torch
    from mlflow.tracking import MlflowClient

    from pipeline import models

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    client = MlflowClient(f"sqlite:///{baseline / 'mlflow.db'}")
    logged = sorted((baseline / "mlartifacts" / "models").glob("*/artifacts/MLmodel"))
    assert len(logged) == 3
    for mlmodel in logged:
        meta = yaml.safe_load(mlmodel.read_text())
        folder = mlmodel.parent / meta["flavors"]["pytorch"]["model_data"]
        assert sorted(p.name for p in folder.iterdir()) == ["model.pt2"]  # no model.pth, no pickle module file
        name = client.get_run(meta["run_id"]).data.tags["model"]
        loaded = mlflow.pytorch.load_model(str(mlmodel.parent))  # MLflow checks the archive holds no pickle
        reference, _ = models.load_weights(baseline / "models" / f"{name}.safetensors")
        x = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.allclose(loaded(x), reference(x), atol=1e-6), name


@pytest.mark.slow
def test_no_secret_from_the_environment_is_logged(baseline: Path) -> None:
    """Tokens/passwords in the stages' environment and in the git remote URL appear nowhere in the store."""
    secrets = [*SECRETS.values(), REMOTE_TOKEN]
    store = [baseline / "mlflow.db", *(p for p in (baseline / "mlartifacts").rglob("*") if p.is_file())]
    blobs = {str(p): p.read_bytes() for p in store}
    assert any(b"train@mlp" in blob for blob in blobs.values())  # the scan does see what was logged
    for path, blob in blobs.items():
        for secret in secrets:
            assert secret.encode() not in blob, f"{secret} found in {path}"
    for run in runs(baseline):
        logged = json.dumps([run.data.params, run.data.tags])
        assert not [s for s in secrets if s in logged]
        assert "5ecret" not in logged
        if url := run.data.tags.get("mlflow.source.git.repoURL"):
            assert url == "https://example.invalid/team/pipeline.git"
