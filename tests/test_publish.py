"""files.publish: a stage's several outputs appear together or not at all; an OSError is one line naming the file."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import files
from pipeline.errors import PipelineError


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


def test_all_outputs_appear_together(tmp_path: Path) -> None:
    data = tmp_path / "data"
    old = data / "truth.json"
    data.mkdir()
    old.write_text("old")
    with files.publish() as out:
        pq.write_table(pa.table({"x": [1.0, 2.0]}), out.path(data / "train.parquet"))
        out.path(data / "raw.bin").write_bytes(b"\x00\x01")
        files.write_json(out.path(old), {"b": 1, "a": 2})
        assert sorted(p.name for p in data.iterdir() if not p.name.endswith(".tmp")) == ["truth.json"]
        assert old.read_text() == "old"  # nothing replaced while the block runs
    assert pq.read_table(data / "train.parquet").column("x").to_pylist() == [1.0, 2.0]
    assert (data / "raw.bin").read_bytes() == b"\x00\x01"
    assert old.read_text() == json.dumps({"a": 2, "b": 1}, indent=2) + "\n"
    assert (data / "raw.bin").stat().st_mode & 0o777 == files._file_mode()
    assert _leftovers(tmp_path) == []


def test_an_oserror_midway_publishes_nothing_and_names_the_file(tmp_path: Path) -> None:
    """The third output fails with ENOSPC after two were written: no target exists, no temp is left."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.parquet").write_bytes(b"previous run")
    with pytest.raises(files.PublishError) as caught:
        with files.publish() as out:
            out.path(data / "train.parquet").write_bytes(b"new train")
            out.path(data / "val.parquet").write_text("new val")
            tmp = out.path(data / "test.parquet")
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")  # what a full disk raises from write()
    message = str(caught.value)
    assert isinstance(caught.value, PipelineError)
    assert message == (
        f"{data / 'test.parquet'}: no space left on device (ENOSPC); nothing was published, "
        "free some space on that disk and run the stage again"
    )
    assert "\n" not in message
    assert (data / "train.parquet").read_bytes() == b"previous run"
    assert sorted(p.name for p in data.iterdir()) == ["train.parquet"]


def test_the_error_names_the_file_a_library_failed_on(tmp_path: Path) -> None:
    """An OSError carrying a temp file's name is reported under that temp's target, not the last one handed out."""
    with pytest.raises(files.PublishError, match=r"a\.bin: read-only file system \(EROFS\); nothing was published"):
        with files.publish() as out:
            first = out.path(tmp_path / "a.bin")
            out.path(tmp_path / "b.bin")
            raise OSError(errno.EROFS, "Read-only file system", str(first))
    with pytest.raises(files.PublishError, match=r"c\.parquet: no space left on device \(ENOSPC\)"):
        with files.publish() as out:  # pyarrow puts the errno in the message only
            out.path(tmp_path / "c.parquet")
            raise OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert _leftovers(tmp_path) == []


def test_a_real_failure_while_writing_leaves_nothing(tmp_path: Path) -> None:
    """A target under a regular file (ENOTDIR from the OS itself): the first output is not published either."""
    blocker = tmp_path / "plots"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(files.PublishError, match=r"plots/loss/mlp\.csv: (not a directory \(ENOTDIR\)|file exists \(EEXIST\))"):
        with files.publish() as out:
            out.path(tmp_path / "models" / "mlp.safetensors").write_text("weights")
            out.path(blocker / "loss" / "mlp.csv").write_text("epoch,loss")
    assert not (tmp_path / "models" / "mlp.safetensors").exists()
    assert _leftovers(tmp_path) == []


def test_a_failed_rename_says_what_was_already_published(tmp_path: Path) -> None:
    """The second target is a folder: os.replace fails after the first rename, and the line says so."""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep").write_text("x")
    with pytest.raises(files.PublishError) as caught:
        with files.publish() as out:
            out.path(tmp_path / "a").write_text("A")
            out.path(tmp_path / "b").write_text("B")
    assert str(caught.value).startswith(f"{tmp_path / 'b'}: is a directory (EISDIR); already published: {tmp_path / 'a'},")
    assert (tmp_path / "a").read_text() == "A"
    assert _leftovers(tmp_path) == []


def test_other_exceptions_pass_through_and_remove_the_temps(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        with files.publish() as out:
            out.path(tmp_path / "a").write_text("A")
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []
