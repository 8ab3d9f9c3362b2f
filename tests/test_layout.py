"""The map matches the territory: README's layout lists every module, docs name only what exists,
no two modules of pipeline/ and stages/ import each other (directly or around a loop), and a stage
module run by itself says how stages run."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.helpers import ROOT, bare_nodeid, longest_first, run_env


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "RESULTS.md"]
# What the pipeline writes (DVC outputs, MLflow's store, scratch): named in the docs, absent from a clean clone.
GENERATED = ("data/", "models/", "metrics/", "plots/", "dvc_plots/", "mlartifacts/", "mlruns/", ".mlflow-spool/",
             ".mlflow-server/", ".dvc/tmp/", "gpu-check-logs/", "bench/.work/", ".venv/", ".checkpoints/")


def _layout_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1].splitlines()[1:]


def _layout_paths() -> set[str]:
    """The files the layout block names, as paths from the root (indentation gives the folder)."""
    found, folders = set(), {}
    for line in _layout_block():
        name = line.split()[0] if line.strip() else ""
        depth = (len(line) - len(line.lstrip())) // 2
        if name.endswith("/"):
            folders[depth] = name.rstrip("/")
        elif name:
            found.add("/".join([*(folders[d] for d in range(depth)), name]))
    return found


def test_readme_layout_lists_every_module_and_nothing_else() -> None:
    modules = {str(p.relative_to(ROOT)) for folder in ("pipeline", "stages") for p in (ROOT / folder).rglob("*.py")
               if p.name != "__init__.py"}
    listed = _layout_paths()
    assert modules - listed == set(), "modules missing from README's layout"
    assert {p for p in listed if not (ROOT / p).exists()} == set(), "README's layout names files that do not exist"


def test_quick_start_is_the_first_section() -> None:
    sections = re.findall(r"^## (.+)$", (ROOT / "README.md").read_text(), re.M)
    assert sections[0] == "Quick start", sections


def test_docs_name_only_files_and_modules_that_exist() -> None:
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        written = set(re.findall(r"<!-- docs-test: write to (\S+) -->", text))  # a file the doc has its reader write
        for token in re.findall(r"`([^`\s]+)`", text):
            path = token.split("#")[0].split(":")[0]
            outside = path.startswith("../shared/")  # the GPU box's folder beside the checkout (docs/gpu.md)
            if re.fullmatch(r"[\w.-]+(/[\w.-]+)+\.(py|md|sh|yaml|toml)", path) and not path.startswith(GENERATED) \
                    and not outside and path not in written:
                if not (ROOT / path).exists() and not (doc.parent / path).exists():
                    missing.append(f"{doc.relative_to(ROOT)}: {token}")
        for name in re.findall(r"`((?:pipeline|stages|tracking)(?:\.\w+)+)", text):
            if not _resolves(name if not name.startswith("tracking.") else f"pipeline.{name}"):
                missing.append(f"{doc.relative_to(ROOT)}: {name}")
        for module in re.findall(r"python -m ([\w.]+)", text):
            if module.split(".")[0] in ("pipeline", "stages", "bench"):
                base = ROOT / module.replace(".", "/")
                if not (base.with_suffix(".py").exists() or (base / "__main__.py").exists()):
                    missing.append(f"{doc.relative_to(ROOT)}: python -m {module}")
    assert missing == []


def _resolves(dotted: str) -> bool:
    """Whether a dotted name is a module of the project, or an attribute of one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _project_imports() -> dict[str, set[str]]:
    """{module: the project modules it imports, at its top or inside a function} over pipeline/ and stages/ (by ast).

    A package is its __init__; `from pipeline import data` names the module data, `from pipeline.tracking import
    StageRun` the package. A submodule's implicit import of its own package is not an edge (Python runs the
    package first, which is no loop of the project's making).
    """
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for folder in ("pipeline", "stages") for p in (ROOT / folder).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                deps.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                            for a in node.names)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_no_two_project_modules_import_each_other_directly_or_around_a_loop() -> None:
    graph = _project_imports()
    assert graph["pipeline.dvc_params"] >= {"pipeline.config"} and "pipeline.tracking.run" in graph["pipeline.tracking"]
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"import cycle: {' -> '.join((*path[path.index(node):], node))}"
        if node in done:
            return
        for dep in sorted(graph[node]):
            visit(dep, (*path, node))
        done.add(node)

    for module in sorted(graph):
        visit(module, ())


@pytest.mark.parametrize("module", sorted(p.stem for p in (ROOT / "stages").glob("*.py") if not p.stem.startswith("__")))
def test_a_stage_module_run_by_itself_fails_with_the_usage_line(module: str, tmp_path: Path) -> None:
    """`python -m stages.train mlp` is no entry point: exit 2 and the usage line, before the module (torch) loads."""
    proc = subprocess.run([sys.executable, "-m", f"stages.{module}", "mlp"], cwd=tmp_path, capture_output=True, text=True,
                          env=run_env(PYTHONPATH=str(ROOT)), timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.startswith("usage: python -m stages {params,generate,train <model>,evaluate}") \
        and f"(`python -m stages.{module}` runs nothing)" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_dvc_reads_its_files_with_the_c_parser() -> None:
    """DVC parses dvc.lock, dvc.yaml and params.yaml many times a command (69 times for one queued experiment) with
    ruamel.yaml's `YAML(typ="safe")`: in C with ruamel.yaml.clib (pyproject.toml), 15 times slower in Python without."""
    from ruamel.yaml import YAML

    assert YAML(typ="safe").Parser.__name__ == "CParser", "ruamel.yaml.clib is missing: DVC parses in Python"


def test_the_longest_unit_of_work_is_dealt_first() -> None:
    """conftest's order for xdist: a group's tests stay together, costed as their sum; unknown tests count as the
    median; ties keep the collection order."""
    def item(nodeid: str, group: str | None = None) -> Any:
        marker = SimpleNamespace(args=(group,), kwargs={}) if group else None
        return SimpleNamespace(nodeid=nodeid, get_closest_marker=lambda name: marker if name == "xdist_group" else None)

    items = [item("a"), item("g1", "g"), item("b"), item("g2", "g"), item("new"), item("c")]
    order = [i.nodeid for i in longest_first(items, {"a": 5.0, "b": 30.0, "c": 1.0, "g1": 10.0, "g2": 10.0})]
    assert order == ["b", "g1", "g2", "new", "a", "c"]  # g: 20 s in all; new: the median, 10 s


@pytest.fixture(scope="module")
def module_scoped() -> str:
    """A module-scoped fixture: conftest puts this module's tests in one xdist group."""
    return __name__


def test_a_module_with_a_module_scoped_fixture_reaches_xdist_as_one_group(request: pytest.FixtureRequest,
                                                                          module_scoped: str) -> None:
    """xdist deals a group to one worker by the `@group` suffix it appends to each grouped test's node id. When the
    mark comes too late (conftest's hook after xdist's) or pytest moves the node id where xdist does not set it
    (pytest 9.2 with xdist 3.8), no suffix: the groups fall apart and every worker builds the module's fixtures."""
    if not hasattr(request.config, "workerinput"):
        pytest.skip("the groups exist only under xdist (`./tasks.sh test` runs it)")
    assert request.node.nodeid.endswith(f"@{module_scoped}"), request.node.nodeid
    assert bare_nodeid(request.node.nodeid) == f"tests/test_layout.py::{request.node.name}"
