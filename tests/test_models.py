"""The three models: shapes, weight files that round-trip without pickle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import models


def test_linear_from_weights_matches_the_formula() -> None:
    w = torch.tensor([[1.0], [-2.0], [0.5]])
    b = torch.tensor([0.25])
    X = torch.randn(7, 3)
    model = models.linear_from_weights(w, b)
    torch.testing.assert_close(model(X), X @ w + b)


@pytest.mark.parametrize("activation", sorted(models.ACTIVATIONS))
def test_mlp_shape_and_layers(activation: str) -> None:
    model = models.mlp(4, [16, 8], activation, dropout=0.1)
    assert model(torch.randn(5, 4)).shape == (5, 1)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(4, 16), (16, 8), (8, 1)]
    assert sum(isinstance(m, torch.nn.Dropout) for m in model) == 2
    assert models.count_parameters(model) == 4 * 16 + 16 + 16 * 8 + 8 + 8 + 1


@pytest.mark.parametrize(
    "spec",
    [models.ModelSpec("linear", 3), models.ModelSpec("mlp", 3, (5,), "tanh", 0.0)],
)
def test_weights_round_trip_through_safetensors(tmp_path: Path, spec: models.ModelSpec) -> None:
    model = models.build(spec)
    path = tmp_path / "m.safetensors"
    models.save_weights(model, spec, path)
    loaded, loaded_spec = models.load_weights(path)
    assert loaded_spec == spec
    X = torch.randn(4, 3)
    torch.testing.assert_close(loaded(X), model.eval()(X))
    assert path.read_bytes()[8:9] == b"{"  # safetensors: 8-byte header length, then a JSON header


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="allowed: linear, mlp"):
        models.build(models.ModelSpec("cnn", 3))  # type: ignore[arg-type]


def test_spec_json_is_the_header_earlier_versions_wrote() -> None:
    """The header bytes are hashed into dvc.lock: a linear spec has no mlp fields, keys stay sorted."""
    assert models.ModelSpec("linear", 3).to_json() == '{"kind": "linear", "n_features": 3}'
    mlp = models.ModelSpec("mlp", 3, (5, 4), "tanh", 0.1)
    assert mlp.to_json() == '{"activation": "tanh", "dropout": 0.1, "hidden": [5, 4], "kind": "mlp", "n_features": 3}'
    assert models.ModelSpec.from_json(mlp.to_json()) == mlp
