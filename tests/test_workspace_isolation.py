"""The suite and the benchmark build from the committed params.yaml, whatever the user's workspace holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

import bench.workspace
from tests.helpers import run_env, set_params

# A user mid-experiment: a tweaked model, and what a failed `dvc exp run` can leave behind.
EDITS = {"mlp.hidden": [3], "mlp.distributed.nproc": 2, "data.n_samples": 40}


def test_edited_params_and_stale_outputs_do_not_reach_tests_or_copies(tmp_path: Path) -> None:
    user = bench.workspace.copy_project(tmp_path / "user", {}, skip=())  # the whole project, tests included
    set_params(user, EDITS)  # not committed
    (user / "models").mkdir(exist_ok=True)
    (user / "models" / "mlp.safetensors").write_bytes(b"stale")

    copy = bench.workspace.copy_project(tmp_path / "copy", {"linear.lr": 0.5}, root=user)
    params = yaml.safe_load((copy / "params.yaml").read_text())
    assert params["mlp"]["hidden"] == [64, 64] and params["mlp"]["distributed"]["nproc"] == 1
    assert params["data"]["n_samples"] == 20000 and params["linear"]["lr"] == 0.5
    assert not (copy / "models" / "mlp.safetensors").exists()

    # The tests that read the defaults pass in that workspace (they failed there when they read params.yaml).
    tests = ["tests/test_defaults.py::test_params_file_is_valid_and_flattens_for_mlflow",
             "tests/test_config.py::test_repository_params_are_valid", "tests/test_sweep_params.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *tests],
                          cwd=user, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert yaml.safe_load((user / "params.yaml").read_text())["mlp"]["hidden"] == [3]  # the user's edit is untouched
