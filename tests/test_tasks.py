"""`./tasks.sh`: a usage table of every subcommand, and `--help` answered by each."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.helpers import ROOT, run_env

TASKS = ROOT / "tasks.sh"
# The subcommands are the labels of tasks.sh's `case "$cmd"`: a new one without a usage row fails here.
SUBCOMMANDS = re.findall(r"^  ([a-z]+)\)", TASKS.read_text(), re.MULTILINE)


def _tasks(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(TASKS), *args], cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120)


def test_subcommands_found() -> None:
    assert set(SUBCOMMANDS) >= {"install", "repro", "test", "ui", "compare", "server", "serve", "bench", "sync"}


@pytest.mark.bad_input
@pytest.mark.parametrize("args", [(), ("bogus",)], ids=["none", "unknown"])
def test_no_or_bad_command_prints_the_usage_table(args: tuple[str, ...]) -> None:
    proc = _tasks(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    if args:
        assert lines.pop(0) == "tasks.sh: unknown command 'bogus'"
    assert lines[0] == "usage: ./tasks.sh <command> [arguments]"
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(SUBCOMMANDS)  # one row each
    assert all(len(line.split(None, 1)) == 2 for line in lines[1:])  # and each says what it does
    assert not any(line.startswith("#") for line in lines)  # no raw comment lines


# What each `--help` starts with: tasks.sh's own row, or the help of the tool the command runs.
HELP_STARTS = {
    "install": "usage: ./tasks.sh <command> [arguments]\n  install ",
    "ui": "usage: ./tasks.sh <command> [arguments]\n  ui ",
    "repro": "usage: dvc repro ",
    "test": "usage: python -m pytest ",
    "compare": "usage: python -m pipeline.compare ",
    "search": "usage: python -m pipeline.search ",
    "server": "# A shared MLflow tracking server",
    "serve": "usage: python -m pipeline.serve ",
    "bench": "usage: python -m bench ",
    "sync": "usage: ./tasks.sh sync ",
    "warm": "usage: ./tasks.sh warm ",
}


def test_every_subcommand_has_a_help_expectation() -> None:
    assert sorted(HELP_STARTS) == sorted(SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_answers_help(command: str) -> None:
    if not list((ROOT / ".venv").glob(".installed-*")):
        pytest.skip("the project is not installed in .venv: ./tasks.sh install")  # never install from a test
    proc = _tasks(command, "--help")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.startswith(HELP_STARTS[command]), proc.stdout[:300]
