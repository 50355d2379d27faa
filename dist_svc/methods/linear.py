"""Weighted sums: task arithmetic (of task vectors), linear (of weights) and passthrough.

    task_arithmetic  lambda * sum_i w_i tau_i   (normalize: divided by sum_i w_i)
    linear           sum_i w_i x_i / sum_i w_i  over every input, the base too when given
    passthrough      the one input's weights, times `scale` when set

All three are element-wise, so workers stream them in blocks.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from dist_svc.methods.base import (
    DENSITY, INT8_MASK, LAMBDA, REQUIRED, WEIGHT, Param, normalize, register, rescale,
)


def weighted_sum(task_deltas: Iterable[torch.Tensor], weights: Sequence[float], lam: float = 1.0,
                 normalize: bool = False) -> torch.Tensor:
    """`lam * sum_i w_i tau_i`, divided by `sum_i w_i` when `normalize` (mergekit's semantics,
    including its rule that a weight sum of ~0 is left undivided).

    Iterates the deltas once and accumulates in the first one's memory, so a lazy sequence that
    reads each task vector from storage keeps only one of them alive.
    """
    merged = None
    n = 0
    for delta, weight in zip(task_deltas, weights):
        merged = delta * weight if merged is None else merged.add_(delta, alpha=weight)
        n += 1
    if merged is None or n != len(weights):
        raise ValueError(f"task_arithmetic: {n} task vectors for {len(weights)} weights")
    if normalize:
        total = float(sum(weights))
        if abs(total) >= 1e-8:
            merged.div_(total)
    if lam != 1.0:
        merged.mul_(lam)
    return merged


@register("task_arithmetic", LAMBDA, normalize(False), rescale(False), INT8_MASK, WEIGHT, DENSITY,
          sample={"weight": 1.0}, reference="https://arxiv.org/abs/2212.04089")
def task_arithmetic(deltas, p, where):
    # `rescale` and `density` are declared by mergekit's task arithmetic too, and do nothing there.
    return weighted_sum(deltas, p["weight"], p["lambda"], p["normalize"])


def _weights_sum_nonzero(p) -> str | None:
    if p["normalize"] and sum(p["weight"]) == 0:
        return "the weights sum to 0 with normalize: true (the average is undefined)"
    return None


@register("linear", Param("weight", REQUIRED, scope="input", doc="each input's weight, the base's too"),
          normalize(True), operates_on="weights", base="ignored", check=_weights_sum_nonzero,
          sample={"weight": 1.0}, reference="https://arxiv.org/abs/2203.05482")
def linear(weights, p, where):
    """mergekit's linear: accumulated from zero in input order, then divided by the summed
    weights (as a tensor of the compute dtype)."""
    first = weights[0]
    coefficients = torch.tensor(p["weight"], dtype=first.dtype, device=first.device)
    result = torch.zeros_like(first)
    for tensor, c in zip(weights, coefficients):
        result.addcmul_(tensor, c)
    if p["normalize"]:
        result.div_(coefficients.sum())
    return result


@register("passthrough", Param("scale", None, scope="input", nullable=True, doc="multiplies the weights"),
          operates_on="weights", base="ignored", max_inputs=1)
def passthrough(weights, p, where):
    (tensor,) = weights
    scale = p["scale"][0]
    return tensor if scale is None else tensor * scale
