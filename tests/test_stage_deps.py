"""dvc.yaml's code deps are the code each stage really runs: found by running the stages, checked by `dvc status`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from dvc.repo import Repo
from tests.helpers import ROOT, ColdRepro, committed_params


pytestmark = pytest.mark.slow

# Project code a stage imports but which cannot change its outputs, so it stays out of its deps: the package that
# only talks to MLflow (and processes.py, its check that a run's process is alive), and the warm stage server (how a
# stage process starts). An edit there must not retrain anything.
NOT_DEPS = ("pipeline/tracking/", "pipeline/warm.py", "pipeline/processes.py")
# A model's module is loaded by every stage, to check its params.yaml block; only its own train stage runs it.
ZOO = "pipeline/zoo/"
MODULES = sorted(p.relative_to(ROOT).as_posix() for folder in ("pipeline", "stages") for p in (ROOT / folder).rglob("*.py"))


def _deps(modules: set[str], stage: str) -> set[str]:
    """The modules that belong in a stage's deps: all it ran but the tracking package, and of the models' modules
    only its own model's."""
    own = f"{ZOO}{stage.partition('@')[2]}.py"
    return {m for m in modules if not m.startswith(NOT_DEPS)
            and not (m.startswith(ZOO) and m != f"{ZOO}__init__.py" and m != own)}


def _items(foreach: list[str] | str | None) -> list[str | None]:
    """A foreach's items: its list, or the params.yaml list it names (`${models}`); [None] for a plain stage."""
    if isinstance(foreach, str):
        return yaml.safe_load(committed_params())[foreach.strip("${} ")]
    return foreach or [None]


def _code_deps(stages: dict) -> dict[str, set[str]]:
    """Each stage's .py deps in dvc.yaml, foreach items resolved."""
    out = {}
    for name, block in stages.items():
        for item in _items(block.get("foreach")):
            body = block["do"] if item else block
            deps = {d.replace("${item}", item or "") for d in body.get("deps", [])}
            out[f"{name}@{item}" if item else name] = {d for d in deps if d.endswith(".py")}
    return out


@pytest.fixture(scope="module")
def ran(cold_repro: ColdRepro) -> dict[str, set[str]]:
    """Project modules each stage's process loaded, package markers with no code left out."""
    return {stage: {m for m in mods if (ROOT / m).stat().st_size} for stage, mods in cold_repro.modules.items()}


@pytest.fixture(scope="module")
def repo(cold_repro: ColdRepro, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the cold repro's project (the run's workers share the original), for the edits below."""
    return shutil.copytree(cold_repro.repo, tmp_path_factory.mktemp("deps") / "repo", symlinks=True)


def test_every_stage_depends_on_exactly_the_project_code_it_runs(ran: dict[str, set[str]]) -> None:
    declared = _code_deps(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert set(ran) == set(declared), "every stage ran (and no other project process)"
    for stage, modules in ran.items():
        needed = _deps(modules, stage)
        assert declared[stage] >= needed, f"{stage}: dvc.yaml misses {sorted(needed - declared[stage])}"
        assert declared[stage] <= needed, f"{stage}: dvc.yaml lists code it never runs: {sorted(declared[stage] - needed)}"


@pytest.mark.parametrize("module", MODULES)
def test_editing_a_module_reruns_exactly_the_stages_that_run_it(
    repo: Path, ran: dict[str, set[str]], module: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
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
    assert changed == {stage for stage, mods in ran.items() if module in _deps(mods, stage)}


def test_the_warm_server_preloads_every_compiler_module_a_stage_loads(cold_repro: ColdRepro, preloaded: set[str]) -> None:
    """torch.use_deterministic_algorithms and the optimizers import torch's compiler (seconds, cold): a stage
    started warm finds every such module loaded already, so it imports none anew."""
    assert set(cold_repro.compiler) == set(cold_repro.modules), "every stage process was probed"
    assert any(cold_repro.compiler.values()), "no stage loaded the compiler: the probe saw nothing"
    for stage, loaded in cold_repro.compiler.items():
        missing = loaded - preloaded
        assert not missing, f"{stage} loads {sorted(missing)[:10]}, which the warm server does not"
