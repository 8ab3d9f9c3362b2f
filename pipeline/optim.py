"""The optimizer and learning-rate schedule named in params.yaml, as torch objects."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def make_optimizer(
    name: str, params: Iterator[nn.Parameter], lr: float | torch.Tensor, weight_decay: float, device: torch.device,
    capturable: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer by name; fused kernels where PyTorch has them for this device.

    `capturable` (with `lr` a device tensor) makes its step recordable in a CUDA
    graph: no host reads, the learning rate changed in place by the schedule.
    """
    fused = device.type in ("cpu", "cuda")
    if name == "sgd":  # SGD keeps no step count: it is capturable as it is
        return OPTIMIZERS["sgd"](params, lr=lr, weight_decay=weight_decay, fused=fused)
    if name in ("adam", "adamw"):
        return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay, fused=fused, capturable=capturable)
    raise ValueError(f"unknown optimizer {name!r}; allowed: sgd, adam, adamw")


def make_schedule(name: str, optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch learning-rate schedule: constant, cosine to zero, or ÷10 every third of the run."""
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, epochs // 3), gamma=0.1)
    raise ValueError(f"unknown schedule {name!r}; allowed: constant, cosine, step")
