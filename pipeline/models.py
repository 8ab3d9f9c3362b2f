"""The architectures the models of pipeline/zoo/ build (a linear layer, an MLP), and their weights on disk as plain tensors.

Every model maps X [n, d] to predictions [n, 1]. Weights are saved with
safetensors together with the small architecture `ModelSpec` needed to rebuild the
module, so loading never unpickles anything.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.errors import PipelineError, first_line

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


@dataclass(frozen=True)
class ModelSpec:
    """What rebuilds a model from its weights; stored as JSON in the safetensors header."""

    kind: Literal["linear", "mlp"]
    n_features: int
    hidden: tuple[int, ...] = ()  # the mlp fields; a linear spec has none
    activation: str = ""
    dropout: float = 0.0

    def to_json(self) -> str:
        """The header's JSON: sorted keys, a linear model's without the mlp fields (the bytes dvc.lock hashes)."""
        fields: dict[str, object] = {"kind": self.kind, "n_features": self.n_features}
        if self.kind == "mlp":
            fields |= {"hidden": list(self.hidden), "activation": self.activation, "dropout": self.dropout}
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        """The spec `to_json` wrote."""
        fields = json.loads(text)
        return cls(**fields | {"hidden": tuple(fields.get("hidden", ()))})


def linear(n_features: int) -> nn.Linear:
    """y = X·W + b: the architecture of every linear model."""
    return nn.Linear(n_features, 1)


def linear_from_weights(w: torch.Tensor, b: torch.Tensor) -> nn.Linear:
    """Wrap hand-trained tensors w [d, 1] and b [1] as an nn.Linear (W = wᵀ)."""
    module = linear(w.shape[0]).to(w.device)
    with torch.no_grad():
        module.weight.copy_(w.detach().T)
        module.bias.copy_(b.detach().reshape(1))
    return module


def mlp(n_features: int, hidden: Sequence[int], activation: str, dropout: float) -> nn.Sequential:
    """Linear → activation → dropout, once per hidden width, then a linear head."""
    layers: list[nn.Module] = []
    width = n_features
    for h in hidden:
        layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def build(spec: ModelSpec) -> nn.Module:
    """A fresh model of the architecture `spec` describes."""
    if spec.kind == "linear":
        return linear(spec.n_features)
    if spec.kind == "mlp":
        return mlp(spec.n_features, spec.hidden, spec.activation, spec.dropout)
    raise ValueError(f"unknown model kind {spec.kind!r}; allowed: linear, mlp")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_weights(model: nn.Module, spec: ModelSpec, path: str | Path) -> None:
    """Write the state dict (CPU, contiguous) and spec to a safetensors file at `path` (a publish temp)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"spec": spec.to_json()})


class WeightsError(PipelineError):
    """A weights file is missing, or is not one this pipeline wrote; the message names it."""


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Rebuild a model from a safetensors file written by `save_weights`; one-line WeightsError when it cannot."""
    if not Path(path).exists():
        raise WeightsError(f"{path}: missing; run `dvc repro` to train it")
    try:
        with safe_open(str(path), framework="pt") as fh:
            spec = ModelSpec.from_json((fh.metadata() or {})["spec"])
        model = build(spec)
        model.load_state_dict(load_file(str(path), device=str(device)))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        reason = first_line(f"{type(exc).__name__}: {exc}")
        raise WeightsError(f"{path}: not a weights file this pipeline wrote ({reason}); run `dvc repro` to retrain") from None
    return model.to(device).eval(), spec


def predict(model: nn.Module, X: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Predictions [n] of a model on X, `chunk` rows per forward pass, without building a graph."""
    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(X[i : i + chunk])) for i in range(0, len(X), chunk)])
    return pred.numpy().ravel()


def linear_weights(model: nn.Module) -> tuple[np.ndarray, float] | None:
    """(w [d], b) of a linear model, to compare with the true weights; None for a model that has no such weights."""
    if not isinstance(model, nn.Linear):
        return None
    return model.weight.detach().numpy().ravel(), float(model.bias.item())
