"""Documentation that is executed: every ```console block of README.md and docs/*.md runs in a throwaway
workspace, in order per document, and prints what the doc shows (tests/docs_runner.py has the convention).

README.md starts where a user starts, from a fresh `git clone` (of the shared tiny `baseline`: its
dvc.lock is committed, so the first repro must leave `git status` clean); the other guides start from a
finished pipeline, as their reader has one. params.yaml is the committed file, comments and all, with
the TINY values written in place, so the docs' `sed` lines find what they edit.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.docs_runner import Block, DocFailure, mismatch, parse, run_doc
from tests.helpers import ROOT, TINY, clone, committed_params, run_env, sh, tiny_params

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FRESH_CLONE = {"README.md"}  # the rest start from a finished pipeline


def tiny_text(text: str, updates: dict[str, Any]) -> str:
    """params.yaml's text with dotted-key values replaced in place, its comments kept."""
    path: list[tuple[int, str]] = []
    out = []
    for line in text.splitlines(keepends=True):
        m = re.match(r"^( *)([A-Za-z_]\w*):( *)([^#\n]*?)( *#.*)?$", line.rstrip("\n"))
        if m:
            indent, key, gap, value, comment = len(m[1]), m[2], m[3], m[4], m[5] or ""
            while path and path[-1][0] >= indent:
                path.pop()
            dotted = ".".join([k for _, k in path] + [key])
            if dotted in updates:
                new = str(updates[dotted]).replace("'", "")
                line = f"{m[1]}{key}:{gap}{new.ljust(len(value)) if comment else new}{comment}\n"
            if not value:
                path.append((indent, key))
        out.append(line)
    return "".join(out)


def venv_stub(repo: Path) -> None:
    """.venv as this test run's environment, linked (never installed into): tasks.sh finds its install stamp."""
    venv = repo / ".venv"
    venv.mkdir()
    prefix = Path(run_env()["PATH"].split(":")[0]).parent
    for entry in prefix.iterdir():
        if not entry.name.startswith("."):
            (venv / entry.name).symlink_to(entry)
    stamp = subprocess.run("cksum < pyproject.toml", shell=True, cwd=repo, capture_output=True, text=True, check=True)
    (venv / f".installed-{stamp.stdout.split()[0]}").touch()


def workspace(doc: Path, baseline: Path, dest: Path) -> Path:
    """Where `doc` runs: a fresh clone of the tiny baseline, or a copy of it with the pipeline's outputs."""
    if doc.name in FRESH_CLONE:
        sh(dest.parent, "git", "clone", "-q", str(baseline), dest.name)
    else:
        clone(baseline, dest)
    text = tiny_text(committed_params(), TINY)
    assert yaml.safe_load(text) == tiny_params(), "tiny_text changed something else than TINY's values"
    (dest / "params.yaml").write_text(text)
    sh(dest, "git", "commit", "-qam", "params.yaml with its comments (the same values)")
    venv_stub(dest)
    return dest


def not_run(blocks: list[tuple[Block, str]]) -> str:
    return "\n".join(f"  {b.where()}: {reason}" for b, reason in blocks)


def test_every_block_not_run_says_why_and_names_a_test_that_exists() -> None:
    reasons = [(b, b.directive) for doc in DOCS for b in parse(doc) if b.directive is not None]
    print(f"blocks not run by the docs test:\n{not_run(reasons)}")  # noqa: T201 - the list the issue asks for
    assert reasons
    for block, reason in reasons:
        assert re.fullmatch(r"skip \(.+\)|covered by .+", reason), f"{block.where()}: {reason!r}"
        if reason.startswith("covered by"):
            named = re.findall(r"(?:tests|docs)/[\w./]*", reason)
            assert named and all((ROOT / n).exists() for n in named), f"{block.where()}: names no file that exists: {reason}"


def test_runner_reads_the_convention(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- docs-test: skip (needs a GPU) -->\n```console\n$ false\n```\n\n```bash\nfalse\n```\n"
                   "```console\n$ printf 'a 1\\nb 2\\nc\\n' \\\n  && echo x\na 7\n…\nc\n$ cd sub && export V=3\n"
                   "$ echo $V $(basename $PWD)\n3 sub\n```\n")
    (tmp_path / "sub").mkdir()
    blocks = parse(doc)
    assert [(b.directive, len(b.commands)) for b in blocks] == [("skip (needs a GPU)", 1), (None, 3)]
    assert blocks[1].commands[0].text.endswith("&& echo x")
    assert [b.where() for b, _ in run_doc(doc, tmp_path, run_env())] == ["doc.md:2"]
    assert mismatch(["a 1", "c"], "a 1\nb 2\nc") == "c"  # neighbours in the doc, not in the output
    assert mismatch(["Stage 'x' didn't change", "…", "Running stage 'y':"], "Stage 'x' didn't change\nz\nRunning stage 'y':") is None


@pytest.mark.slow
def test_a_broken_command_in_a_doc_fails_the_docs_test(baseline: Path, tmp_path: Path) -> None:
    """A copy of README.md with a wrong flag on its first command: the runner stops there and says where."""
    doc = tmp_path / "README.md"
    doc.write_text((ROOT / "README.md").read_text().replace("$ ./tasks.sh repro ", "$ ./tasks.sh repro --no-such-flag ", 1))
    repo = workspace(doc, baseline, tmp_path / "repo")
    with pytest.raises(DocFailure, match=r"README\.md:\d+: `\./tasks\.sh repro --no-such-flag .*` exited 2"):
        run_doc(doc, repo, run_env())
    wrong = tmp_path / "wrong-output.md"
    wrong.write_text("```console\n$ dvc version --help\nusage: dvc version [-h] [--no-such-option]\n```\n")
    with pytest.raises(DocFailure, match="did not print 'usage: dvc version"):
        run_doc(wrong, repo, run_env())


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_documented_commands_work(doc: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    blocks = parse(doc)
    if not blocks:
        pytest.skip(f"{doc.name}: no console block (nothing it tells a user to run)")
    if all(b.directive is not None for b in blocks):
        pytest.skip(f"{doc.name}: no block to run:\n{not_run([(b, b.directive or '') for b in blocks])}")
    repo = workspace(doc, request.getfixturevalue("baseline"), tmp_path / "repo")  # built only when a block runs
    start = time.perf_counter()
    skipped = run_doc(doc, repo, run_env())
    print(f"{doc.name}: ran in {time.perf_counter() - start:.0f} s; not run:\n{not_run(skipped)}")  # noqa: T201
