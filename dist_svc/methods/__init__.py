"""Base merge methods: pure functions from task vectors to one merged delta.

A method takes the task vectors `tau_i = ft_i - base` of one tensor (same shape, float32 or
wider), the per-model weights and its parameters, and returns the merged delta `Wm`. No files,
no Ray, no globals: the worker reads and writes, the calibration rescales `Wm` afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from dist_svc.methods.task_arithmetic import task_arithmetic


@dataclass(frozen=True)
class ParamSpec:
    default: Any
    kind: type = float


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., torch.Tensor]
    parameters: dict[str, ParamSpec] = field(default_factory=dict)
    # Element-wise methods can run on any block of a tensor on its own, so workers stream them.
    elementwise: bool = True

    def merge(self, task_deltas: Sequence[torch.Tensor], weights: Sequence[float], params: dict[str, Any]) -> torch.Tensor:
        return self.fn(task_deltas, weights, **params)


METHODS: dict[str, Method] = {
    "task_arithmetic": Method(
        "task_arithmetic",
        lambda deltas, weights, **p: task_arithmetic(deltas, weights, lam=p["lambda"], normalize=p["normalize"]),
        {"lambda": ParamSpec(1.0), "normalize": ParamSpec(False, bool)},
    ),
}
