"""The CUDA-graph epoch (pipeline/graphed.py): the same training as the eager loop, or a stated reason to stay eager.

On a CPU the graph code runs with its programs executed eagerly (warm-up, buffers,
plan, tensor learning rate, schedule), which is everything but the recording; on
CUDA the recorded graphs are checked against the eager loop too.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from pipeline import graphed, models, optim, training
from tests.helpers import requires_cuda


def _problem(device: str = "cpu", n: int = 1000, d: int = 6) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=gen)
    y = X @ torch.randn(d, 1, generator=gen) + torch.sin(X[:, :1]) + 0.1 * torch.randn(n, 1, generator=gen)
    cut = n * 4 // 5
    return tuple(t.to(device) for t in (X[:cut], y[:cut], X[cut:], y[cut:]))


def _fit(device: str, cuda_graph: bool, *, hidden: tuple[int, ...] = (16, 16), dropout: float = 0.0,
         **overrides: Any) -> training.TrainResult:
    X, y, Xv, yv = _problem(device)
    torch.manual_seed(1)
    model = models.mlp(X.shape[1], list(hidden), "relu", dropout).to(device)
    kwargs: dict[str, Any] = dict(optimizer="adam", lr=0.01, weight_decay=0.0, batch_size=48, epochs=6, seed=3,
                                  schedule="cosine", patience=None, progress=False)
    return training.fit(model, training.Splits(X, y, Xv, yv), training.FitSettings(**(kwargs | overrides), cuda_graph=cuda_graph))


@pytest.fixture
def graphs_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let fit take the graph path on a CPU: the programs then run eagerly, nothing is recorded."""
    monkeypatch.setattr(graphed, "blocker", lambda *_: None)


def _weights(result: training.TrainResult) -> list[torch.Tensor]:
    return [t.detach().cpu() for t in result.model.state_dict().values()]


@pytest.mark.parametrize(("schedule", "max_steps"), [("constant", 32), ("cosine", 32), ("step", 32), ("cosine", 4)])
def test_graph_path_is_bit_for_bit_the_eager_loop_with_sgd(
    graphs_on_cpu: None, monkeypatch: pytest.MonkeyPatch, schedule: str, max_steps: int,
) -> None:
    # SGD reads its learning rate the same way from a float and a tensor, so nothing may differ:
    # not the batches, not the schedule, not the warm-up (which must leave no trace), not the cut
    # of an epoch into runs of one program (4 steps: 17 batches are four runs of one, then one more).
    monkeypatch.setattr(graphed, "MAX_GRAPH_STEPS", max_steps)
    eager = _fit("cpu", False, optimizer="sgd", schedule=schedule, patience=2)
    graph = _fit("cpu", True, optimizer="sgd", schedule=schedule, patience=2)
    assert graph.loop == "cuda_graph" and eager.loop == "eager (cuda_graph is off)"
    assert graph.history == eager.history and graph.best_step == eager.best_step
    for a, b in zip(_weights(graph), _weights(eager)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_graph_path_matches_the_eager_loop_with_adam_to_float_precision(graphs_on_cpu: None, optimizer: str) -> None:
    # Adam with a tensor learning rate rounds its step size differently in the last bit.
    eager = _fit("cpu", False, optimizer=optimizer, weight_decay=0.01)
    graph = _fit("cpu", True, optimizer=optimizer, weight_decay=0.01)
    torch.testing.assert_close(graph.history.val_loss, eager.history.val_loss, rtol=1e-5, atol=0)
    for a, b in zip(_weights(graph), _weights(eager)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_an_epoch_longer_than_one_graph_repeats_a_program_and_ends_with_the_rest() -> None:
    X, y, _, _ = _problem()  # 800 rows, batch 48: 16 full batches and one of 32 rows
    model = models.mlp(X.shape[1], [8], "relu", 0.0)
    opt = optim.make_optimizer("sgd", model.parameters(), torch.tensor(0.01), 0.0, X.device)
    epoch = graphed.GraphedEpoch(model, opt, X, y, 48, capture=False, max_steps=5)
    assert [(start, p.rows) for start, p in epoch.plan] == [(0, 240), (240, 240), (480, 240), (720, 80)]
    assert epoch.plan[0][1] is epoch.plan[2][1]  # one program, replayed
    twin = models.mlp(X.shape[1], [8], "relu", 0.0)
    twin.load_state_dict(model.state_dict())
    twin_opt = optim.make_optimizer("sgd", twin.parameters(), 0.01, 0.0, X.device)
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))
    losses = epoch(perm).clone()
    for j, i in enumerate(range(0, X.shape[0], 48)):
        rows = perm[i : i + 48]
        loss = torch.nn.functional.mse_loss(twin(X[rows]), y[rows])
        twin_opt.zero_grad(set_to_none=True)
        loss.backward()
        twin_opt.step()
        assert losses[j].item() == loss.item(), j
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_capture_refuses_an_optimizer_that_has_already_stepped() -> None:
    X, y, _, _ = _problem()
    model = nn.Linear(X.shape[1], 1)
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01))
    nn.functional.mse_loss(model(X), y).backward()
    opt.step()
    with pytest.raises(ValueError, match="fresh optimizer"):
        graphed.GraphedEpoch(model, opt, X, y, 64, capture=True)


def test_what_stays_eager_says_why() -> None:
    cuda = torch.device("cuda")
    assert graphed.blocker(torch.device("cpu"), models.mlp(4, [8], "relu", 0.0), 1) == "device is cpu"
    assert "DDP" in graphed.blocker(cuda, models.mlp(4, [8], "relu", 0.0), 2)
    assert "dropout" in graphed.blocker(cuda, models.mlp(4, [8], "relu", 0.1), 1)
    assert graphed.blocker(cuda, models.mlp(4, [8], "relu", 0.0), 1) is None
    assert _fit("cpu", True).loop == "eager (device is cpu)"  # the CPU path is the eager loop, untouched


@requires_cuda
def test_cuda_graphs_train_what_the_eager_cuda_loop_trains() -> None:
    for optimizer in ("sgd", "adam", "adamw"):
        eager = _fit("cuda", False, optimizer=optimizer, patience=3)
        graph = _fit("cuda", True, optimizer=optimizer, patience=3)
        assert graph.loop == "cuda_graph"
        assert graph.history.step == eager.history.step, optimizer
        torch.testing.assert_close(graph.history.val_loss, eager.history.val_loss, rtol=1e-4, atol=1e-6)
        for a, b in zip(_weights(graph), _weights(eager)):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@requires_cuda
def test_cuda_graphs_cover_long_epochs_and_dropout_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graphed, "MAX_GRAPH_STEPS", 4)  # 800 rows / 48: 4 replays of one graph, then the rest
    eager = _fit("cuda", False, optimizer="sgd")
    graph = _fit("cuda", True, optimizer="sgd")
    torch.testing.assert_close(graph.history.val_loss, eager.history.val_loss, rtol=1e-5, atol=1e-7)
    dropped = _fit("cuda", True, dropout=0.2)
    assert dropped.loop.startswith("eager (dropout")
    assert dropped.history.val_loss[-1] < dropped.history.val_loss[0]
