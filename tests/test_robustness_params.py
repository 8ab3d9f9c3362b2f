"""Bad params stop before any work: one line, dvc.lock and outputs untouched, no MLflow run.

Set-up shared by tests/test_robustness_*.py: tests/helpers.py, and the `baseline` fixture in tests/conftest.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import (
    N_TRAIN, assert_untouched, clone, dvc, free_port, output_of, outputs, run_env, runs, set_params, split_files,
)


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


# (text appended to params.yaml, the start of the one line `dvc repro` prints): keys no stage depends on
UNKNOWN_BLOCKS = [
    ("mpl:\n  lr: 0.5\n", "params: invalid params.yaml: mpl: unknown key (did you mean 'mlp'?); allowed in the top level: seed,"),
    ("sed: 7\n", "params: invalid params.yaml: sed: unknown key (did you mean 'seed'?)"),
]


@pytest.mark.slow
@pytest.mark.bad_input
def test_unknown_block_is_reported_by_dvc_repro_when_no_stage_would_run(baseline: Path, tmp_path: Path) -> None:
    """A misspelled block (`mpl:` for `mlp:`) or unknown key changes no param a computing stage lists, so only the
    `params` check runs: `dvc repro` fails with its one line, instead of "up to date"; nothing else runs or changes."""
    repo = clone(baseline, tmp_path / "repo")
    assert "Data and pipelines are up to date." in dvc(repo, "status").stdout
    good = (repo / "params.yaml").read_text()
    before, lock = outputs(repo), (repo / "dvc.lock").read_bytes()
    for added, expected in UNKNOWN_BLOCKS:
        (repo / "params.yaml").write_text(good + added)
        proc = dvc(repo, "repro", check=False)
        text = output_of(proc)
        assert proc.returncode != 0, text
        assert re.findall(r"Running stage '([^']+)'", text) == ["params"], text
        lines = [line for line in text.splitlines() if "unknown key" in line]
        assert len(lines) == 1 and lines[0].startswith(expected), text
        assert "Traceback" not in text
        assert_untouched(repo, before, lock)
        assert runs(repo) == []
    (repo / "params.yaml").write_text(good)
    assert "Data and pipelines are up to date." in output_of(dvc(repo, "repro"))


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


# ---------------------------------------------------------------- params that would exhaust the machine


ALIAS_BOMB = "[" + ", ".join(
    f"&l{i} [" + ", ".join([f"*l{i - 1}" if i else "1"] * 9) + "]" for i in range(9)
) + "]"  # 9**9 widths once expanded: hundreds of MB of repr, minutes of validation


def _line_of(text: str, mark: str) -> int:
    """The 1-based number of the first line of `text` that holds `mark`."""
    return next(i for i, line in enumerate(text.splitlines(), start=1) if mark in line)


def _hostile(good: str) -> dict[str, tuple[str, str]]:
    """name -> (params.yaml text, the start of the one line the stage prints after its name)."""
    params = yaml.safe_load(good)

    def edited(section: str, key: str, value: str) -> str:
        """params.yaml with one key's value written out as `value` (YAML text)."""
        copy = {name: dict(block) if isinstance(block, dict) else block for name, block in params.items()}
        del copy[section][key]
        text = yaml.safe_dump(copy, sort_keys=False)
        return text.replace(f"{section}:\n", f"{section}:\n  {key}: {value}\n", 1)

    return {
        "50 MB file": (big := good + "junk: [" + "1, " * 16_000_000 + "1]\n",
                       f"params.yaml: larger than 128 KiB ({len(big.encode())} bytes)"),
        "alias bomb in mlp.hidden": (
            bomb := edited("mlp", "hidden", ALIAS_BOMB),
            f"params.yaml: the value at line {_line_of(bomb, '&')} is reused through a YAML anchor and alias (&name, *name)",
        ),
        "n_samples 1e12": (
            edited("data", "n_samples", "1000000000000"),
            "invalid params.yaml: data.n_samples: got 1000000000000; must be less than or equal to 1000000000",
        ),
        "huge list under an unknown key": (
            good + "junk: [" + "123456, " * 14_000 + "1]\n",
            "invalid params.yaml: junk: unknown key; allowed in the top level:",
        ),
        "huge mlp.hidden": (
            edited("mlp", "hidden", "[" + "8, " * 20_000 + "8]"),
            "invalid params.yaml: mlp.hidden: got [8, 8, 8, 8, 8, 8, ...]; must have at most 32 item(s)",
        ),
    }


def _stage(repo: Path, *argv: str) -> tuple[subprocess.CompletedProcess[str], float, set[str]]:
    """Run a stage entry point; return it, its wall time, and the top-level modules it imported."""
    import time

    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", *argv], cwd=repo, env=run_env(PYTHONPROFILEIMPORTTIME="1"),
        capture_output=True, text=True, timeout=120,
    )
    seconds = time.perf_counter() - start
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return proc, seconds, imported


def _files(repo: Path) -> set[str]:
    return {str(p.relative_to(repo)) for p in repo.rglob("*") if ".git" not in p.relative_to(repo).parts}


@pytest.mark.bad_input
def test_hostile_params_stop_before_work_in_one_line(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Each case, through `python -m stages generate` and `python -m stages train mlp`: exit 2, one short
    line, torch never imported, nothing written, and no slower than a one-typo params.yaml plus a second."""
    from tests.helpers import copy_project

    repo = copy_project(tmp_path / "repo")
    good = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(good + "typo: 1\n")
    _, baseline, _ = _stage(repo, "stages", "generate")  # start-up and the config check of an ordinary mistake
    cases = _hostile(good)
    request.node.user_properties.append(("bad_input_cases", 2 * len(cases)))
    before = _files(repo)
    for name, (text, expected) in cases.items():
        (repo / "params.yaml").write_text(text)
        for argv, stage in ((("stages", "generate"), "generate"), (("stages", "train", "mlp"), "train@mlp")):
            proc, seconds, imported = _stage(repo, *argv)
            lines = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
            assert proc.returncode == 2, f"{name}, {stage}: exit {proc.returncode}\n{lines[:5]}"
            assert len(lines) == 1 and lines[0].startswith(f"{stage}: {expected}"), f"{name}, {stage}: {lines[:3]}"
            assert len(lines[0]) < 400 and proc.stdout == "", f"{name}, {stage}: {len(lines[0])} characters"
            assert "torch" not in imported and "mlflow" not in imported and "numpy" not in imported, name
            assert seconds < baseline + 1.0, f"{name}, {stage}: {seconds:.2f} s (a plain typo: {baseline:.2f} s)"
            assert _files(repo) == before, f"{name}, {stage}: wrote {sorted(_files(repo) - before)}"


def test_data_that_does_not_fit_is_refused_with_the_estimate_and_the_free_space(tmp_path: Path) -> None:
    """data.check_fits (generate calls it before drawing a row): disk first, then memory, in one line each."""
    import shutil

    from pipeline import config, data

    assert data.check_fits(20_000, 10, tmp_path / "data") == data.footprint(20_000, 10)  # data/ need not exist
    with pytest.raises(data.DataTooLarge) as caught:
        data.check_fits(config.MAX_SAMPLES, config.MAX_FEATURES, tmp_path / "data")
    free = shutil.disk_usage(tmp_path).free
    message = str(caught.value)
    assert message.startswith(f"data.n_samples={config.MAX_SAMPLES} x data.n_features={config.MAX_FEATURES} needs about 40.8 TB on disk, but {tmp_path} has ")
    assert re.search(r" has [\d.]+ [KMGT]?B free; lower data.n_samples or data.n_features, or free some space$", message), message
    assert "\n" not in message and len(message) < 250

    ram = data.physical_memory()
    assert ram is not None
    n = int(ram * 0.75 / 44)  # 11 float32 columns per row: on disk 0.75x the RAM, in memory 1.5x
    if data.footprint(n, 10).disk >= free:
        pytest.skip("this disk has less free space than the machine has memory")
    with pytest.raises(data.DataTooLarge, match=r"needs about [\d.]+ GB of memory to train on, but this machine has [\d.]+ GB; lower data.n_samples"):
        data.check_fits(n, 10, tmp_path)


@pytest.mark.parametrize("rows,features", [(20_000, 10), (300_001, 3)])
def test_the_disk_estimate_covers_what_generate_writes(tmp_path: Path, rows: int, features: int) -> None:
    from pipeline import data

    sizes = {"train": rows - 2 * (rows // 7), "val": rows // 7, "test": rows // 7}
    data.generate(split_files(tmp_path), seed=0, n_samples=rows, n_features=features, noise_std=1.0, nonlinearity=0.0, rows=sizes)
    written = sum((tmp_path / f"{s}.parquet").stat().st_size for s in data.SPLITS)
    estimate = data.footprint(rows, features).disk
    assert written <= estimate < written * 1.1, (written, estimate)
