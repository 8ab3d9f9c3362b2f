"""The `pipeline` tag: what makes stage runs one execution (a real git repo, no DVC run needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import tracking
from tests.helpers import sh


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("params.yaml", "dvc.lock", "data/.gitignore"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("a: 1\n")
    sh(tmp_path, "git", "init", "-q", "-b", "main")
    sh(tmp_path, "git", "add", "-A")
    sh(tmp_path, "git", "commit", "-qm", "base")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    return tmp_path


def test_dvc_experiment_is_named_by_dvc(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "sweet-tuna")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "1a2b3c4d5e6f")
    (repo / "params.yaml").write_text("a: 2\n")  # the experiment's own params do not change its id
    assert tracking.pipeline_id("ffffffffff") == "sweet-tuna@1a2b3c4"
    assert tracking.context_tags()["pipeline"] == "sweet-tuna@1a2b3c4"


def test_plain_repro_is_commit_plus_uncommitted_changes(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_ROOT", str(repo))  # DVC runs the stage
    commit = sh(repo, "git", "rev-parse", "HEAD").stdout.strip()
    assert tracking.pipeline_id(commit) == f"repro@{commit[:7]}"
    # DVC rewrites dvc.lock and .gitignore files between stages: same execution, same id.
    (repo / "dvc.lock").write_text("a: 2\n")
    (repo / "data" / ".gitignore").write_text("/x\n")
    assert tracking.pipeline_id(commit) == f"repro@{commit[:7]}"
    (repo / "params.yaml").write_text("a: 2\n")
    edited = tracking.pipeline_id(commit)
    assert edited.startswith(f"repro@{commit[:7]}+") and len(edited) == len(f"repro@{commit[:7]}+") + 8
    assert tracking.pipeline_id(commit) == edited  # the same state, the same group
    (repo / "params.yaml").write_text("a: 3\n")
    assert tracking.pipeline_id(commit) not in (edited, f"repro@{commit[:7]}")


def test_a_stage_run_by_hand_is_tagged_as_such(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DVC_ROOT", raising=False)  # `python -m stages train mlp`, no DVC
    commit = sh(repo, "git", "rev-parse", "HEAD").stdout.strip()
    tags = tracking.context_tags()
    assert tags["pipeline"] == f"hand@{commit[:7]}" and tags["started_by"] == "hand"
    monkeypatch.setenv("DVC_ROOT", str(repo))
    assert tracking.context_tags()["started_by"] == "dvc"
