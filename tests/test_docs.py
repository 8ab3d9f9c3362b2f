"""Documentation that is executed: every ```console block of README.md and docs/*.md runs in a throwaway
workspace, in order per document, and prints what the doc shows.

The convention, in the Markdown:
- A ```console block is a list of commands to run: each line starting with `$ ` is one command (a line
  ending in `\\` continues on the next); the lines after it, up to the next `$ `, are its expected output.
  Any other block (```bash, ```text, plain ```) is an illustration and is not run.
- Expected output is compared for its structure, not its values (the tests run on tiny params): numbers,
  hex ids and DVC's random experiment names are masked, runs of spaces are one. Expected lines must come
  in order; lines with nothing between them in the doc must be neighbours in the output (blank lines
  aside); a `…` (or `...`) line stands for any lines, and a `…` inside a line for any text (a path).
- Exit status: a command must exit 0, unless its output ends with a line `[exit N]`: then it must exit
  exactly N (a failure the doc shows, with the one line it prints).
- `<!-- docs-test: skip (why) -->` or `<!-- docs-test: covered by tests/test_x.py -->` right before a
  block: not run, and listed by the test with that reason (a GPU, a browser, a long-running server, a
  keystroke, or a test that already runs these commands).
- `<!-- docs-test: setup: <shell command> -->` right before a block (one or more, each on its line): run
  before the block, in the same shell, and must exit 0. For a situation the doc describes but that would
  confuse a reader as a command (a server's port taken, a run's process killed at a given moment).
- `<!-- docs-test: write to <path> -->` or `<!-- docs-test: append to <path> -->` right before a block of any
  language: the file the reader is told to write (or to add to), so the test writes that block's text there,
  in the doc's shell's folder, when its turn comes (docs/models.md writes a model's module this way).

README.md starts where a user starts, from a fresh `git clone` (of the shared tiny `baseline`: its
dvc.lock is committed, so the first repro must leave `git status` clean); the other guides start from a
finished pipeline, as their reader has one (its outputs, no MLflow store yet). Each document runs in
order in one throwaway workspace; `export`, `unset`, `source` and `cd` carry over from one command to the
next, as in one terminal. params.yaml is the committed file, comments and all, with the TINY values
written in place, so the docs' `sed` lines find what they edit (they edit keys TINY leaves alone).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import ROOT, TINY, clone, committed_params, run_env, sh, tiny_params

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FRESH_CLONE = {"README.md"}  # the rest start from a finished pipeline
DIRECTIVE = re.compile(r"^<!--\s*docs-test:\s*(.+?)\s*-->$")
SETUP = re.compile(r"^setup:\s*(.+)$")
WRITE = re.compile(r"^(write|append) to (\S+)$")
EXIT = re.compile(r"^\[exit (\d+)\]$")
GAP = {"…", "..."}
_MASKS = [
    (re.compile(r"\b[0-9a-f]{7,}\b"), "<id>"),                  # run ids, commits, digests
    (re.compile(r"\b[a-z]+-[a-z]+\b"), "<exp>"),                # DVC experiment names (sworn-coal)
    (re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"), "<n>"),      # every number
]


@dataclass
class Command:
    """One `$ ` line (with its continuation lines), the output shown under it, and the exit status it must end with."""

    text: str
    line: int
    expected: list[str] = field(default_factory=list)
    exit: int = 0


@dataclass
class Block:
    """A ```console block of a document, the skip/covered directive before it (None: run it), and its hidden setup."""

    doc: Path
    line: int
    commands: list[Command]
    directive: str | None = None
    setup: list[Command] = field(default_factory=list)
    file: tuple[str, str, str] | None = None  # (write or append, path, text): a file the doc has the reader write

    def where(self) -> str:
        return f"{self.doc.name}:{self.line}"


class DocFailure(AssertionError):
    """A documented command failed, exited with another status, or printed something else than the doc shows."""


def parse(doc: Path) -> list[Block]:
    """The ```console blocks of a Markdown file, in order."""
    blocks: list[Block] = []
    directive: str | None = None
    setup: list[Command] = []
    lines = doc.read_text().splitlines()
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if m := DIRECTIVE.match(stripped):
            if s := SETUP.match(m.group(1)):
                setup.append(Command(s.group(1), i + 1))
            else:
                directive = m.group(1)
        elif stripped.startswith("```"):
            start, lang = i, stripped[3:].strip()
            i += 1
            body: list[tuple[int, str]] = []
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append((i + 1, lines[i]))
                i += 1
            if lang == "console":
                blocks.append(Block(doc, start + 1, _commands(doc, body), directive, setup))
            elif directive is not None and (w := WRITE.match(directive)):
                text = "".join(f"{line}\n" for _, line in body)
                blocks.append(Block(doc, start + 1, [], None, setup, (w[1], w[2], text)))
            elif directive is not None or setup:
                raise DocFailure(f"{doc.name}:{start + 1}: a docs-test directive before a block that is not ```console")
            directive, setup = None, []
        elif stripped:
            directive, setup = None, []  # a directive belongs to the block right after it
        i += 1
    return blocks


def _commands(doc: Path, body: list[tuple[int, str]]) -> list[Command]:
    commands: list[Command] = []
    continued = False
    for number, text in body:
        if continued:
            commands[-1].text += "\n" + text
        elif text.startswith("$ "):
            commands.append(Command(text[2:], number))
        elif commands and (m := EXIT.match(text.strip())):
            commands[-1].exit = int(m.group(1))
        elif commands:
            if commands[-1].exit and text.strip():
                raise DocFailure(f"{doc.name}:{number}: output after `[exit N]`; it ends its command's output")
            commands[-1].expected.append(text)
        elif text.strip():
            raise DocFailure(f"{doc.name}:{number}: output before the first `$ ` command in a console block")
        continued = (continued or text.startswith("$ ")) and text.endswith("\\")
    return commands


def normalize(line: str) -> str:
    """A line reduced to its structure: values masked, spaces collapsed."""
    for pattern, mask in _MASKS:
        line = pattern.sub(mask, line)
    return " ".join(line.split())


def _pattern(line: str) -> re.Pattern[str]:
    """An expected line as a pattern of normalized output: a `…` inside it stands for any text."""
    return re.compile(".*".join(re.escape(part) for part in normalize(line).split("…")))


def mismatch(expected: list[str], output: str) -> str | None:
    """None when `output` shows the `expected` lines as the convention says; else the first line missing."""
    actual = [normalize(x) for x in output.splitlines() if x.strip()]
    segments: list[list[str]] = [[]]
    for line in expected:
        if line.strip() in GAP:
            segments.append([])
        elif line.strip():
            segments[-1].append(line)

    def fits(want: list[re.Pattern[str]], at: int) -> bool:
        return at + len(want) <= len(actual) and all(p.fullmatch(a) for p, a in zip(want, actual[at:]))

    pos = 0
    for segment in filter(None, segments):
        want = [_pattern(x) for x in segment]
        found = next((s for s in range(pos, len(actual) - len(want) + 1) if fits(want, s)), None)
        if found is None:  # name the first line that breaks the segment
            shown = max(k for k in range(len(want)) if any(fits(want[:k], s) for s in range(pos, len(actual) + 1)))
            return segment[shown]
        pos = found + len(want)
    return None


def run_doc(doc: Path, repo: Path, env: dict[str, str], timeout: float = 600) -> list[tuple[Block, str]]:
    """Run every runnable block of `doc` in `repo`, in order; raise DocFailure at the first that fails.

    Returns the blocks not run, each with its reason.
    """
    with tempfile.TemporaryDirectory(prefix="docs-test-") as tmp:  # the shell's state, outside the workspace
        shell = Shell(repo, env, timeout, Path(tmp))
        skipped: list[tuple[Block, str]] = []
        for block in parse(doc):
            if block.directive is not None:
                skipped.append((block, block.directive))
                continue
            for cmd in block.setup:
                shell.check(doc, cmd, "setup ")
            if block.file is not None:
                shell.write(*block.file)
            for cmd in block.commands:
                shell.check(doc, cmd)
        return skipped


@dataclass
class Shell:
    """One terminal for a document: each command runs in a new bash that takes over the last one's exports and folder."""

    repo: Path
    env: dict[str, str]
    timeout: float
    state: Path

    SCRIPT = ('cd "$(cat "$2" 2>/dev/null || echo "$1")"; [ -f "$3" ] && . "$3"; eval "$4"; rc=$?; '
              'export -p > "$3"; pwd > "$2"; exit $rc')

    def write(self, mode: str, path: str, text: str) -> None:
        """Write (or append) a file the doc tells its reader to write, where the doc's shell now is."""
        folder = Path((self.state / "cwd").read_text().strip()) if (self.state / "cwd").exists() else self.repo
        with open(folder / path, "a" if mode == "append" else "w") as fh:
            fh.write(text)

    def check(self, doc: Path, cmd: Command, what: str = "") -> None:
        """Run `cmd`; raise DocFailure unless it exits as the doc says and prints what it shows."""
        proc = subprocess.Popen(["bash", "-c", self.SCRIPT, "docs-test", str(self.repo), str(self.state / "cwd"),
                                 str(self.state / "env"), cmd.text],
                                cwd=self.repo, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the command's whole group: a killed dvc would orphan its stage
            proc.communicate()
            raise DocFailure(f"{doc.name}:{cmd.line}: {what}`{cmd.text}` ran over {self.timeout:.0f} s") from None
        if proc.returncode != cmd.exit:
            shown = f"[exit {cmd.exit}]" if cmd.exit else "no `[exit N]`, so 0"
            raise DocFailure(f"{doc.name}:{cmd.line}: {what}`{cmd.text}` exited {proc.returncode} (the doc shows "
                             f"{shown})\n{output[-3000:]}")
        if (missing := mismatch(cmd.expected, output)) is not None:
            raise DocFailure(f"{doc.name}:{cmd.line}: `{cmd.text}` did not print {missing!r} where the doc shows it"
                             f"\n--- output\n{output[-3000:]}")


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
    """.venv as this test run's environment, linked (never installed into): tasks.sh finds its install stamp, and the
    stages are served by this run's warm server (a venv is known by its real path). An environment without the stamp
    (not made by tasks.sh) gets a folder of links with the stamp of its own, and a warm server of its own."""
    venv, prefix = repo / ".venv", Path(run_env()["PATH"].split(":")[0]).parent
    stamp = subprocess.run("cksum < pyproject.toml", shell=True, cwd=repo, capture_output=True, text=True, check=True)
    installed = f".installed-{stamp.stdout.split()[0]}"
    if (prefix / installed).exists():
        venv.symlink_to(prefix)
        return
    venv.mkdir()
    for entry in prefix.iterdir():
        if not entry.name.startswith("."):
            (venv / entry.name).symlink_to(entry)
    (venv / installed).touch()


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
                   "$ echo $V $(basename $PWD)\n3 sub\n```\n"
                   "<!-- docs-test: setup: echo hidden > f -->\n<!-- docs-test: setup: export W=4 -->\n"
                   "```console\n$ cat f; echo $W; exit 3\nhidden\n4\n[exit 3]\n$ unset V; echo \"[$V]\"\n[]\n```\n")
    (tmp_path / "sub").mkdir()
    blocks = parse(doc)
    assert [(b.directive, len(b.setup), len(b.commands)) for b in blocks] == [("skip (needs a GPU)", 0, 1), (None, 0, 3), (None, 2, 2)]
    assert blocks[1].commands[0].text.endswith("&& echo x")
    assert [(c.exit, c.expected) for c in blocks[2].commands] == [(3, ["hidden", "4"]), (0, ["[]"])]
    assert [b.where() for b, _ in run_doc(doc, tmp_path, run_env())] == ["doc.md:2"]
    assert (tmp_path / "sub" / "f").read_text() == "hidden\n"  # the setup ran where the doc's shell was
    assert mismatch(["a 1", "c"], "a 1\nb 2\nc") == "c"  # neighbours in the doc, not in the output
    assert mismatch(["Stage 'x' didn't change", "…", "Running stage 'y':"], "Stage 'x' didn't change\nz\nRunning stage 'y':") is None
    assert mismatch(["store at sqlite:///…/mlflow.db answers"], "store at sqlite:////tmp/a b/mlflow.db answers") is None
    assert mismatch(["store at …/mlflow.db answers"], "store at /tmp/mlflow.db.bak answers") is not None  # the rest is literal


def test_a_file_the_doc_has_written_is_written(tmp_path: Path) -> None:
    """`write to` / `append to` before a block of any language: the runner writes its text, in the doc's shell's folder."""
    doc = tmp_path / "doc.md"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "params.yaml").write_text("a: 1\n")
    doc.write_text("```console\n$ cd sub\n```\n<!-- docs-test: write to m.py -->\n```python\nx = 1\n```\n"
                   "<!-- docs-test: append to params.yaml -->\n```yaml\nb: 2\n```\n```console\n$ cat m.py params.yaml\n"
                   "x = 1\na: 1\nb: 2\n```\n")
    assert [b.file for b in parse(doc)] == [None, ("write", "m.py", "x = 1\n"), ("append", "params.yaml", "b: 2\n"), None]
    assert run_doc(doc, tmp_path, run_env()) == []


@pytest.mark.parametrize(("block", "error"), [
    ("$ exit 1\n", r"`exit 1` exited 1 \(the doc shows no `\[exit N\]`, so 0\)"),    # a failure the doc does not show
    ("$ true\n[exit 2]\n", r"`true` exited 0 \(the doc shows \[exit 2\]\)"),       # a failure that did not happen
    ("$ exit 3\n[exit 2]\n", r"`exit 3` exited 3 \(the doc shows \[exit 2\]\)"),   # another failure
    ("$ echo one; exit 2\ntwo\n[exit 2]\n", r"did not print 'two'"),               # the right status, the wrong line
], ids=["unshown-failure", "no-failure", "other-status", "wrong-line"])
def test_a_command_must_exit_as_the_doc_shows(tmp_path: Path, block: str, error: str) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(f"```console\n{block}```\n")
    with pytest.raises(DocFailure, match=error):
        run_doc(doc, tmp_path, run_env())


def test_a_failing_setup_fails_and_a_stray_directive_is_refused(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- docs-test: setup: false -->\n```console\n$ true\n```\n")
    with pytest.raises(DocFailure, match=r"doc\.md:1: setup `false` exited 1"):
        run_doc(doc, tmp_path, run_env())
    doc.write_text("<!-- docs-test: setup: true -->\n```text\n$ true\n```\n")
    with pytest.raises(DocFailure, match="directive before a block that is not"):
        parse(doc)


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
    if doc.name in LEFT_BEHIND:
        LEFT_BEHIND[doc.name](repo)


def added_model_only(repo: Path, name: str = "ridge") -> None:
    """What docs/models.md promises beyond what it prints: adding a model is its module and its params.yaml block (the
    list and the block), every other change is DVC's, and the model was trained, evaluated and registered (the page's
    `./tasks.sh compare --model ridge` printed its row, and `dvc metrics show` its metrics, or it failed already)."""
    status = sh(repo, "git", "status", "--porcelain", "--untracked-files=all").stdout.splitlines()
    changed = {line[3:] for line in status}
    by_dvc = {"dvc.lock"} | {p for p in changed if p.endswith("/.gitignore")}
    assert changed - by_dvc == {"params.yaml", f"pipeline/zoo/{name}.py"}, status
    before = yaml.safe_load(sh(repo, "git", "show", "HEAD:params.yaml").stdout)
    after = yaml.safe_load((repo / "params.yaml").read_text())
    block = after.pop(name)
    assert after == before | {"models": [*before["models"], name]} and block, block
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert f"models/{name}.safetensors" in [o["path"] for o in lock[f"train@{name}"]["outs"]]
    assert (repo / "metrics" / "evaluation" / f"{name}.json").is_file()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    champion = client.get_model_version_by_alias(f"regression-{name}", "champion")
    assert client.get_run(champion.run_id).data.tags["stage"] == f"train@{name}"


# Checks run after a doc's commands, on the workspace they left: what a doc promises beyond what its commands print.
LEFT_BEHIND = {"models.md": added_model_only}


METRICS_COMMAND = re.compile(r"^dvc metrics (show|diff)\b.*--precision (\d+)")


def figures(doc: Path) -> list[tuple[Block, Command, str, int]]:
    """The `dvc metrics show|diff … --precision N` commands of a doc, with their block: (block, command, kind, N)."""
    return [(block, cmd, m[1], int(m[2])) for block in parse(doc) for cmd in block.commands
            if (m := METRICS_COMMAND.match(cmd.text))]


def shown_rows(cmd: Command) -> list[list[str]]:
    """The table rows a metrics command shows, as cells ('…' lines and the header left out)."""
    return [line.split() for line in cmd.expected if line.startswith("metrics/")]


def check_figure(shown: str, value: Any, digits: int, where: str) -> None:
    """A figure as the doc prints it (DVC rounds to `digits` decimals; '-' where the file has no such metric)."""
    if shown == "-":
        assert value is None, f"{where}: the doc shows '-', the metrics file has {value}"
        return
    assert value is not None and abs(float(shown) - value) <= 0.5 * 10**-digits + 1e-12, \
        f"{where}: the doc shows {shown}, the metrics file has {value} (rounded to {digits} decimals: {round(value, digits)})"


@pytest.mark.slow
def test_readme_figures_are_the_committed_pipelines(default_repro: Path, tmp_path: Path) -> None:
    """README's metrics blocks show, to the digits they show, what the committed code and params give.

    A default `dvc repro` of the committed params reproduces the committed dvc.lock's metrics files (same md5),
    so its metrics files are the committed ones; every figure of a `dvc metrics show` block is compared with
    them. A `dvc metrics diff` block's HEAD column is compared with them too, and its workspace column with the
    files after the commands the block runs before it (the edit of params.yaml and `dvc repro`).
    """
    found = figures(ROOT / "README.md")
    assert {kind for *_, kind, _ in found} == {"show", "diff"}, "README has no metrics blocks to check"
    repo = clone(default_repro, tmp_path / "repo")  # the run's default repro: the commands below change it
    lock = yaml.safe_load(sh(ROOT, "git", "show", "HEAD:dvc.lock").stdout)["stages"]
    committed = {o["path"]: o["md5"] for stage in lock.values() for o in stage.get("outs", [])}
    made = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for path, md5 in ((o["path"], o["md5"]) for stage in made.values() for o in stage.get("outs", [])):
        if path.startswith("metrics/"):
            assert committed.get(path) == md5, f"{path}: the committed dvc.lock is stale; regenerate it (dvc repro)"

    def metrics(path: str) -> dict[str, Any]:
        return yaml.safe_load((repo / path).read_text())

    before = {row[0]: metrics(row[0]) for *_, cmd, _, _ in found for row in shown_rows(cmd)}
    for block, cmd, kind, digits in found:
        where = f"README.md:{cmd.line}"
        if kind == "show":
            header = next(line.split() for line in cmd.expected if line.startswith("Path"))
            for path, *cells in shown_rows(cmd):
                for column, cell in zip(header[1:], cells, strict=True):
                    check_figure(cell, before[path].get(column), digits, f"{where} {path} {column}")
            continue
        for earlier in block.commands[:block.commands.index(cmd)]:  # as the reader runs them: edit, repro
            sh(repo, "bash", "-c", earlier.text, timeout=1200)
        for path, column, head, workspace, change in shown_rows(cmd):
            check_figure(head, before[path].get(column), digits, f"{where} {path} {column} (HEAD)")
            check_figure(workspace, metrics(path).get(column), digits, f"{where} {path} {column} (workspace)")
            check_figure(change, metrics(path)[column] - before[path][column], digits, f"{where} {path} {column} (change)")


def test_a_stale_figure_fails_the_check() -> None:
    """The check behind the README figures test: a figure off by more than its last digit, or a '-' where the file
    has a value, fails (the issue's stale MLP test MSE, 1.0323 for 1.0334, among them)."""
    check_figure("1.0334", 1.03341, 4, "fresh")
    check_figure("0.511", 0.51104, 4, "trailing zero dropped")
    check_figure("-", None, 4, "no such metric")
    for shown, value in (("1.0323", 1.0334), ("0.5105", 0.51104), ("-", 1.0)):
        with pytest.raises(AssertionError):
            check_figure(shown, value, 4, "stale")
