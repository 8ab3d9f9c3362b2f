"""dvc.yaml's code deps are the code each stage really runs: found by running the stages, checked by `dvc status`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from dvc.repo import Repo
from tests.helpers import ROOT, Reproduced


pytestmark = pytest.mark.slow

# Project code a stage imports but which cannot change its outputs, so it stays out of its deps: the package that
# only talks to MLflow, and the warm stage server (how a stage process starts). An edit there must not retrain anything.
NOT_DEPS = ("pipeline/tracking/", "pipeline/warm.py")
MODULES = sorted(p.relative_to(ROOT).as_posix() for folder in ("pipeline", "stages") for p in (ROOT / folder).rglob("*.py"))


def _deps(modules: set[str]) -> set[str]:
    """The modules that belong in a stage's deps: all it ran but the tracking package."""
    return {m for m in modules if not m.startswith(NOT_DEPS)}


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
def ran(reproduced: Reproduced) -> dict[str, set[str]]:
    """Project modules each stage's process loaded in the shared repro, package markers with no code left out."""
    return {stage: {m for m in mods if (ROOT / m).stat().st_size} for stage, mods in reproduced.modules.items()}


def test_every_stage_depends_on_exactly_the_project_code_it_runs(ran: dict[str, set[str]]) -> None:
    declared = _code_deps(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert set(ran) == set(declared), "every stage ran (and no other project process)"
    for stage, modules in ran.items():
        needed = _deps(modules)
        assert declared[stage] >= needed, f"{stage}: dvc.yaml misses {sorted(needed - declared[stage])}"
        assert declared[stage] <= needed, f"{stage}: dvc.yaml lists code it never runs: {sorted(declared[stage] - needed)}"


@pytest.mark.parametrize("module", MODULES)
def test_editing_a_module_reruns_exactly_the_stages_that_run_it(
    reproduced: Reproduced, ran: dict[str, set[str]], module: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(reproduced.repo)  # DVC names stages relative to the working directory
    path = reproduced.repo / module
    before = path.read_text()
    path.write_text(before + "\n# an edit\n")
    try:
        with Repo(str(reproduced.repo)) as dvc_repo:  # `dvc status`, in-process: no second of CLI start-up per module
            status = dvc_repo.status()
    finally:
        path.write_text(before)
    changed = {stage for stage, entries in status.items() for e in entries if module in e.get("changed deps", {})}
    assert changed == {stage for stage, mods in ran.items() if module in _deps(mods)}


COMPILER = ("torch._dynamo", "torch._inductor", "torch.export")
# What a bare process loads of COMPILER: `import torch` alone (torch 2.13 imports part of torch.export at start-up),
# and with one step of the optimizers the stages use (torch.optim imports torch._dynamo on an optimizer's first
# add_param_group and in every step(): torch/optim/optimizer.py, `_use_grad_for_differentiable`, `torch._disable_dynamo`).
BARE = {
    "torch": "import torch",
    "torch.optim": "import torch\nfor make in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):\n"
                   "    m = torch.nn.Linear(2, 1); o = make(m.parameters(), lr=0.1, fused=True)\n"
                   "    m(torch.ones(1, 2)).sum().backward(); o.step()",
}
OPTIMIZING = {"train@linear", "train@mlp"}  # the stages that step a torch.optim optimizer


def _compiler_modules(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint('\\n'.join(m for m in sys.modules if m.startswith({COMPILER!r})))"
    return set(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split())


def test_no_stage_imports_a_compiler_beyond_torch_and_its_optimizers(reproduced: Reproduced) -> None:
    """Logging the model loads no compiler: a stage loads of torch._dynamo/_inductor/export only what
    `import torch` loads, or, for a stage that steps an optimizer, what one optimizer step loads."""
    bare = {name: _compiler_modules(code) for name, code in BARE.items()}
    assert not {m for m in bare["torch"] if m.startswith(("torch._dynamo", "torch._inductor"))}
    assert set(reproduced.compiler) == set(reproduced.modules), "every stage process was probed"
    for stage, loaded in reproduced.compiler.items():
        allowed = bare["torch.optim" if stage in OPTIMIZING else "torch"]
        assert loaded <= allowed, f"{stage} loaded {sorted(loaded - allowed)[:10]} beyond {allowed and 'torch'}"


def test_no_stage_imports_torch_dynamo_or_inductor(reproduced: Reproduced) -> None:
    for stage, loaded in reproduced.compiler.items():
        assert not {m for m in loaded if m.startswith(("torch._dynamo", "torch._inductor"))}, stage
