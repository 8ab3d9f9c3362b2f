"""Bad params stop before any work: one line, dvc.lock and outputs untouched, no MLflow run.

Set-up shared by tests/test_robustness_*.py: tests/robustness.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import dvc, run_env, set_params
from processes import free_port
from robustness import N_TRAIN, assert_untouched, clone, output_of, outputs, runs


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


# ---------------------------------------------------------------- device: cuda without CUDA


@pytest.mark.slow
@pytest.mark.bad_input
@pytest.mark.skipif("__import__('torch').cuda.is_available()", reason="this machine has CUDA")
def test_cuda_without_cuda_fails_before_store_and_data(baseline: Path, tmp_path: Path) -> None:
    """`device: cuda` is checked right after torch is imported: before mlflow, the store and the data."""
    repo = clone(baseline, tmp_path / "repo")
    set_params(repo, {"device": "cuda"})
    (repo / "data" / "train.parquet").unlink()
    env = run_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}", PYTHONPROFILEIMPORTTIME="1")
    proc = subprocess.run(
        [sys.executable, "-m", "stages", "train", "mlp"], cwd=repo, env=env, capture_output=True, text=True, timeout=300,
    )
    messages = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 1
    assert messages == ["train@mlp: device: got 'cuda', but this machine has no CUDA device; allowed here: auto, cpu"]
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and "mlflow" not in imported
