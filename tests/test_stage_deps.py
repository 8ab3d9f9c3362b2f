"""dvc.yaml's code deps are the code each stage really runs: found by running the stages, checked by `dvc status`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from dvc.repo import Repo

from tests.conftest import ROOT, copy_project, dvc, run_env

PROBE = ROOT / "tests" / "import_probe"  # a sitecustomize that records each process's project modules at exit
# Project modules a stage imports but whose code cannot change its outputs, so they stay out of its deps.
NOT_DEPS = {"pipeline/tracking.py"}  # only talks to MLflow: an edit there must not retrain anything
MODULES = sorted(p.relative_to(ROOT).as_posix() for folder in ("pipeline", "stages") for p in (ROOT / folder).glob("*.py"))


def _stage_name(argv: list[str]) -> str:
    """`python -m stages.train mlp` -> 'train@mlp', as dvc.yaml's foreach names it."""
    module = Path(argv[0]).stem
    return f"{module}@{argv[1]}" if module == "train" else module


def _code_deps(stages: dict) -> dict[str, set[str]]:
    """Each stage's .py deps in dvc.yaml, foreach items resolved."""
    out = {}
    for name, block in stages.items():
        for item in block.get("foreach", [None]):
            body = block["do"] if item else block
            deps = {d.replace("${item}", item or "") for d in body.get("deps", [])}
            out[f"{name}@{item}" if item else name] = {d for d in deps if d.endswith(".py")}
    return out


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, set[str]]]:
    """A tiny project after a real `dvc repro`, and the project modules each stage's process loaded."""
    repo = copy_project(tmp_path_factory.mktemp("deps") / "repo")
    out = tmp_path_factory.mktemp("imports")
    dvc(repo, "repro", env=run_env(PYTHONPATH=str(PROBE), STAGE_IMPORTS_DIR=str(out)))
    ran: dict[str, set[str]] = {}
    for record in map(json.loads, (p.read_text() for p in out.glob("*.json"))):
        ran.setdefault(_stage_name(record["argv"]), set()).update(record["modules"])
    # Package markers with no code cannot change anything.
    ran = {stage: {m for m in mods if (ROOT / m).stat().st_size} for stage, mods in ran.items()}
    return repo, ran


def test_every_stage_depends_on_exactly_the_project_code_it_runs(traced: tuple[Path, dict[str, set[str]]]) -> None:
    _, ran = traced
    declared = _code_deps(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert set(ran) == set(declared), "every stage ran (and no other project process)"
    for stage, modules in ran.items():
        needed = modules - NOT_DEPS
        assert declared[stage] >= needed, f"{stage}: dvc.yaml misses {sorted(needed - declared[stage])}"
        assert declared[stage] <= needed, f"{stage}: dvc.yaml lists code it never runs: {sorted(declared[stage] - needed)}"


@pytest.mark.parametrize("module", MODULES)
def test_editing_a_module_reruns_exactly_the_stages_that_run_it(
    traced: tuple[Path, dict[str, set[str]]], module: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo, ran = traced
    monkeypatch.chdir(repo)  # DVC names stages relative to the working directory
    path = repo / module
    before = path.read_text()
    path.write_text(before + "\n# an edit\n")
    try:
        with Repo(str(repo)) as dvc_repo:  # `dvc status`, in-process: no second of CLI start-up per module
            status = dvc_repo.status()
    finally:
        path.write_text(before)
    changed = {stage for stage, entries in status.items() for e in entries if module in e.get("changed deps", {})}
    assert changed == {stage for stage, mods in ran.items() if module in mods - NOT_DEPS}
