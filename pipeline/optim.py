"""The optimizer and learning-rate schedule named in params.yaml, as torch objects.

torch 2.13's optimizers import the compiler (torch._dynamo, with part of torch._inductor: 1.5 s
and more per train stage) on their first call, only to mark themselves as not to be compiled:
`Optimizer.step` is wrapped to call `torch._dynamo.graph_break()` around the update, and
`zero_grad`, `state_dict`, the functional updates and others go through
`torch._disable_dynamo`, which imports torch._dynamo to build `torch._dynamo.disable(fn)` and
caches it on `fn` as `__dynamo_disable`. Nothing here is ever compiled, and outside
`torch.compile` both are the plain function: so each optimizer class steps through its own
update under `torch.no_grad()` (what the wrapper does when `differentiable` is False), and the
cache is filled with the plain function. The updates are bit for bit those of torch.optim
(tests/test_training.py compares them); hooks, schedules and state dicts are torch's own.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

_OPTIM_MODULES = ("optimizer", "sgd", "adam", "adamw", "lr_scheduler")


@functools.cache
def _without_compiler() -> dict[str, type[torch.optim.Optimizer]]:
    """SGD, Adam and AdamW that never import torch._dynamo (see the module's docstring); built once."""
    lazy = torch._disable_dynamo(lambda: None).__code__  # the code of torch's lazily-importing wrapper
    seen: set[int] = set()

    def fill(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        if isinstance(obj, type):
            for value in vars(obj).values():
                fill(value)
        elif isinstance(obj, types.FunctionType):
            if obj.__code__ is lazy:
                obj.__wrapped__.__dynamo_disable = obj.__wrapped__
            for cell in obj.__closure__ or ():
                try:
                    contents = cell.cell_contents
                except ValueError:  # a cell not filled yet
                    continue
                fill(contents)

    for name in _OPTIM_MODULES:
        for value in vars(importlib.import_module(f"torch.optim.{name}")).values():
            fill(value)

    def eager(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
        update = inspect.unwrap(cls.step)  # the class's own update, without the graph-break wrapper

        def step(self: torch.optim.Optimizer, closure: Any = None) -> Any:
            with torch.no_grad():
                return update(self, closure)

        return type(cls.__name__, (cls,), {"step": step, "__doc__": cls.__doc__, "__module__": __name__})

    return {"sgd": eager(torch.optim.SGD), "adam": eager(torch.optim.Adam), "adamw": eager(torch.optim.AdamW)}


def make_optimizer(
    name: str, params: Iterator[nn.Parameter], lr: float | torch.Tensor, weight_decay: float, device: torch.device,
    capturable: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer by name; fused kernels where PyTorch has them for this device.

    `capturable` (with `lr` a device tensor) makes its step recordable in a CUDA
    graph: no host reads, the learning rate changed in place by the schedule.
    """
    fused = device.type in ("cpu", "cuda")
    classes = _without_compiler()
    if name == "sgd":  # SGD keeps no step count: it is capturable as it is
        return classes["sgd"](params, lr=lr, weight_decay=weight_decay, fused=fused)
    if name in ("adam", "adamw"):
        return classes[name](params, lr=lr, weight_decay=weight_decay, fused=fused, capturable=capturable)
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
