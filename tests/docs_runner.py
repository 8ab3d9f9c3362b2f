"""Run the commands that README.md and docs/*.md tell a user to run, and check what they print.

The convention, in the Markdown:
- A ```console block is a list of commands to run: each line starting with `$ ` is one command (a line
  ending in `\\` continues on the next); the lines after it, up to the next `$ `, are its expected output.
  Any other block (```bash, ```text, plain ```) is an illustration and is not run.
- Expected output is compared for its structure, not its values (the tests run on tiny params): numbers,
  hex ids and DVC's random experiment names are masked, runs of spaces are one. Expected lines must come
  in order; lines with nothing between them in the doc must be neighbours in the output (blank lines
  aside); a `…` (or `...`) line stands for any lines. A command without expected output must exit 0.
- `<!-- docs-test: skip (why) -->` or `<!-- docs-test: covered by tests/test_x.py -->` right before a
  block: not run, and listed by the test with that reason (a GPU, a browser, a long-running server, or
  a test that already runs these commands).

Each document runs in order in one throwaway workspace; `export`, `source` and `cd` carry over from one
command to the next, as in one terminal.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

DIRECTIVE = re.compile(r"^<!--\s*docs-test:\s*(.+?)\s*-->$")
GAP = {"…", "..."}
_MASKS = [
    (re.compile(r"\b[0-9a-f]{7,}\b"), "<id>"),                  # run ids, commits, digests
    (re.compile(r"\b[a-z]+-[a-z]+\b"), "<exp>"),                # DVC experiment names (sworn-coal)
    (re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"), "<n>"),      # every number
]


@dataclass
class Command:
    """One `$ ` line (with its continuation lines) and the output shown under it."""

    text: str
    line: int
    expected: list[str] = field(default_factory=list)


@dataclass
class Block:
    """A ```console block of a document, and the directive before it (None: run it)."""

    doc: Path
    line: int
    commands: list[Command]
    directive: str | None = None

    def where(self) -> str:
        return f"{self.doc.name}:{self.line}"


class DocFailure(AssertionError):
    """A documented command failed or printed something else than the doc shows."""


def parse(doc: Path) -> list[Block]:
    """The ```console blocks of a Markdown file, in order."""
    blocks: list[Block] = []
    directive: str | None = None
    lines = doc.read_text().splitlines()
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if m := DIRECTIVE.match(stripped):
            directive = m.group(1)
        elif stripped.startswith("```"):
            start, lang = i, stripped[3:].strip()
            i += 1
            body: list[tuple[int, str]] = []
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append((i + 1, lines[i]))
                i += 1
            if lang == "console":
                blocks.append(Block(doc, start + 1, _commands(doc, body), directive))
            directive = None
        elif stripped:
            directive = None  # a directive belongs to the block right after it
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
        elif commands:
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


def mismatch(expected: list[str], output: str) -> str | None:
    """None when `output` shows the `expected` lines as the convention says; else the first line missing."""
    actual = [normalize(x) for x in output.splitlines() if x.strip()]
    segments: list[list[str]] = [[]]
    for line in expected:
        if line.strip() in GAP:
            segments.append([])
        elif line.strip():
            segments[-1].append(line)
    pos = 0
    for segment in filter(None, segments):
        want = [normalize(x) for x in segment]
        found = next((s for s in range(pos, len(actual) - len(want) + 1) if actual[s : s + len(want)] == want), None)
        if found is None:  # name the first line that breaks the segment
            shown = max(k for k in range(len(want)) if any(actual[s : s + k] == want[:k] for s in range(pos, len(actual) + 1)))
            return segment[shown]
        pos = found + len(want)
    return None


def run_doc(doc: Path, repo: Path, env: dict[str, str], timeout: float = 600) -> list[tuple[Block, str]]:
    """Run every runnable block of `doc` in `repo`, in order; raise DocFailure at the first that fails.

    Returns the blocks not run, each with its reason.
    """
    with tempfile.TemporaryDirectory(prefix="docs-test-") as tmp:  # the shell's state, outside the workspace
        return _run_blocks(doc, repo, env, timeout, Path(tmp) / "env", Path(tmp) / "cwd")


def _run_blocks(doc: Path, repo: Path, env: dict[str, str], timeout: float, state: Path, cwd: Path) -> list[tuple[Block, str]]:
    script = ('cd "$(cat "$2" 2>/dev/null || echo "$1")"; [ -f "$3" ] && . "$3"; eval "$4"; rc=$?; '
              'export -p > "$3"; pwd > "$2"; exit $rc')
    skipped: list[tuple[Block, str]] = []
    for block in parse(doc):
        if block.directive is not None:
            skipped.append((block, block.directive))
            continue
        for cmd in block.commands:
            proc = subprocess.Popen(["bash", "-c", script, "docs-test", str(repo), str(cwd), str(state), cmd.text],
                                    cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            try:
                output, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the command's whole group: a killed dvc would orphan its stage
                proc.communicate()
                raise DocFailure(f"{doc.name}:{cmd.line}: `{cmd.text}` ran over {timeout:.0f} s") from None
            if proc.returncode != 0:
                raise DocFailure(f"{doc.name}:{cmd.line}: `{cmd.text}` exited {proc.returncode}\n{output[-3000:]}")
            if (missing := mismatch(cmd.expected, output)) is not None:
                raise DocFailure(f"{doc.name}:{cmd.line}: `{cmd.text}` did not print {missing!r} where the doc shows it"
                                 f"\n--- output\n{output[-3000:]}")
    return skipped
