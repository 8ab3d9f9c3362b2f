"""pipeline/checkpoint.py and the loops' resume: a run stopped at a checkpoint and resumed ends with the same bytes."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline import checkpoint, models, training
from tests.helpers import edit_checkpoint_state


class Stop(Exception):
    """Stands for the process being killed right after a checkpoint."""


def splits() -> training.Splits:
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(400, 4, generator=g), torch.randn(400, 1, generator=g)
    return training.Splits(X[:320], y[:320], X[320:], y[320:])


def fit_mlp(hook: training.Hook = training.no_checkpoints, resume: dict[str, Any] | None = None) -> training.TrainResult:
    """Dropout (CPU RNG), shuffling (its own generator), Adam moments, a cosine schedule, early stopping: all in the state."""
    torch.manual_seed(1)
    model = models.build(models.ModelSpec("mlp", 4, (8,), "relu", 0.2))
    settings = training.FitSettings(optimizer="adam", lr=0.01, weight_decay=0.0, batch_size=32, epochs=8, seed=3,
                                    schedule="cosine", patience=6, progress=False, checkpoint=hook, resume=resume)
    return training.fit(model, splits(), settings)


def stop_after(path: Path, done_at: int) -> training.Hook:
    def hook(done: int, state: Any) -> None:
        if done == done_at:
            checkpoint.save(path, {"loop": state(), "meta": {"run_id": "r1"}}, "k")
            raise Stop

    return hook


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_fit_resumed_from_a_checkpoint_ends_with_the_same_weights_and_curves(tmp_path: Path) -> None:
    whole = fit_mlp()
    path = tmp_path / "ck.safetensors"
    with pytest.raises(Stop):
        fit_mlp(stop_after(path, 3))
    saved, why = checkpoint.load(path, "k")
    assert why == "" and saved is not None and saved["meta"] == {"run_id": "r1"} and saved["loop"]["done"] == 3
    torch.manual_seed(123)  # another process: the global RNG is elsewhere until the checkpoint puts it back
    resumed = fit_mlp(resume=saved["loop"])
    assert resumed.history == whole.history and resumed.best_step == whole.best_step
    assert same_weights(resumed.model, whole.model)


def test_linear_gd_resumed_from_a_checkpoint_ends_with_the_same_weights_and_losses(tmp_path: Path) -> None:
    whole = training.gradient_descent(splits(), steps=50, lr=0.1, progress=False)
    path = tmp_path / "gd.safetensors"
    with pytest.raises(Stop):
        training.gradient_descent(splits(), steps=50, lr=0.1, progress=False, checkpoint=stop_after(path, 20))
    saved, _ = checkpoint.load(path, "k")
    assert saved is not None
    resumed = training.gradient_descent(splits(), steps=50, lr=0.1, progress=False, resume=saved["loop"])
    assert resumed.step_losses == whole.step_losses and resumed.history == whole.history
    assert resumed.extra == whole.extra and same_weights(resumed.model, whole.model)


def test_nested_state_round_trips_without_pickle(tmp_path: Path) -> None:
    state = {"opt": {0: {"step": torch.tensor(3.0), "m": torch.arange(4.0)}}, "betas": (0.9, 0.999),
             "best": None, "val": float("inf"), "hist": [1.5, 2.25], "flag": True, "rng": torch.get_rng_state()}
    path = tmp_path / "s.safetensors"
    checkpoint.save(path, state, "k")
    back, _ = checkpoint.load(path, "k")
    assert back is not None
    assert back["opt"][0]["step"].item() == 3.0 and torch.equal(back["opt"][0]["m"], torch.arange(4.0))
    assert back["betas"] == (0.9, 0.999) and back["best"] is None and back["val"] == float("inf")
    assert back["hist"] == [1.5, 2.25] and back["flag"] is True and torch.equal(back["rng"], state["rng"])
    with pytest.raises(TypeError, match="without pickle"):
        checkpoint.save(path, {"x": object()}, "k")


@pytest.mark.bad_input
@pytest.mark.parametrize("damage, reason", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "damaged or truncated"),
    (lambda p: p.write_bytes(p.read_bytes()[:-1] + bytes([p.read_bytes()[-1] ^ 0xFF])), "do not match their digest"),
    (lambda p: p.write_bytes(b"not a checkpoint"), "damaged or truncated"),
    (lambda p: p.write_bytes(p.read_bytes().replace(b'[\\"done\\", 121]', b'[\\"done\\", 131]')), "its state or tensors"),
], ids=["truncated", "a tensor byte", "not safetensors", "done 121 -> 131"])
def test_a_damaged_checkpoint_is_refused_with_one_line(tmp_path: Path, damage: Any, reason: str) -> None:
    path = tmp_path / "ck.safetensors"
    checkpoint.save(path, {"w": torch.arange(64.0), "done": 121}, "k")
    before = path.read_bytes()
    damage(path)
    assert path.read_bytes() != before
    saved, why = checkpoint.load(path, "k")
    assert saved is None and reason in why and str(path) in why and "\n" not in why


@pytest.mark.bad_input
def test_a_checkpoint_of_other_params_or_another_format_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ck.safetensors"
    checkpoint.save(path, {"w": torch.ones(2)}, checkpoint.key({"mlp.lr": 0.1}, []))
    assert checkpoint.load(path, checkpoint.key({"mlp.lr": 0.1}, []))[0] is not None
    assert "other params, data or code" in checkpoint.load(path, checkpoint.key({"mlp.lr": 0.2}, []))[1]
    monkeypatch.setattr(checkpoint, "FORMAT", checkpoint.FORMAT + 1)
    assert "another version of the project" in checkpoint.load(path, checkpoint.key({"mlp.lr": 0.1}, []))[1]


def test_the_key_follows_file_contents(tmp_path: Path) -> None:
    code = tmp_path / "train.py"
    code.write_text("a = 1\n")
    before = checkpoint.key({}, [code])
    code.write_text("a = 2\n")
    assert checkpoint.key({}, [code]) != before


def test_sigterm_saves_at_the_next_consistent_point_then_stops(tmp_path: Path) -> None:
    hook = checkpoint.Checkpoints(tmp_path / "ck.safetensors", "k", every=0)
    with hook.deferring_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)  # delivered here; the loop goes on to the end of its epoch
        assert hook.interrupted == "stopped by signal SIGTERM"
        with pytest.raises(KeyboardInterrupt, match=r"SIGTERM; checkpoint after epoch 7 kept in"):
            hook(7, lambda: {"done": 7})
    assert checkpoint.load(hook.path, "k")[0] == {"loop": {"done": 7}, "meta": {}}
    assert signal.getsignal(signal.SIGTERM) is not None  # the handler before the block is back


def test_periodic_saves_follow_the_interval(tmp_path: Path) -> None:
    hook = checkpoint.Checkpoints(tmp_path / "ck.safetensors", "k", every=2)
    for done in range(1, 6):
        hook(done, lambda d=done: {"done": d})
    assert hook.saved_at == 4
    assert checkpoint.load(hook.path, "k")[0] == {"loop": {"done": 4}, "meta": {}}
    slow = checkpoint.Checkpoints(tmp_path / "slow.safetensors", "k", every=1, min_seconds=3600)
    slow(1, lambda: {"done": 1})
    assert not slow.path.exists()  # a save is due by epochs, but not by time


@pytest.mark.bad_input
def test_an_unwritable_checkpoint_says_so_once_and_training_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")  # the folder the checkpoint should go in is a file
    hook = checkpoint.Checkpoints(tmp_path / "file" / "ck.safetensors", "k", every=1)
    hook(1, lambda: {"done": 1})
    hook(2, lambda: {"done": 2})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "cannot write checkpoint" in lines[0] and "training goes on" in lines[0]


@pytest.mark.bad_input
@pytest.mark.parametrize("edit", [
    lambda s: s.replace('["done", 3]', '["done", 13]'),  # resume ten epochs later than the weights are
    lambda s: re.sub(r'(\["train_loss", \[\d+\.)(\d)', lambda m: m[1] + str((int(m[2]) + 1) % 10), s, count=1),
    lambda s: s.replace('"r1"', '"r2"'),  # another run id: the resumed stage would log into another run
], ids=["done", "history digit", "run id"])
def test_an_edited_state_is_refused_like_damaged_tensors(tmp_path: Path, edit: Any) -> None:
    """The digest covers the JSON state (epoch, histories, scheduler, run id) as well as the tensors."""
    path = tmp_path / "ck.safetensors"
    with pytest.raises(Stop):
        fit_mlp(stop_after(path, 3))
    assert checkpoint.load(path, "k")[0] is not None
    edit_checkpoint_state(path, edit)
    saved, why = checkpoint.load(path, "k")
    assert saved is None and why == f"{path} is damaged (its state or tensors do not match their digest)"
