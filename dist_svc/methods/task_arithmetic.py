from __future__ import annotations

from typing import Iterable, Sequence

import torch


def task_arithmetic(task_deltas: Iterable[torch.Tensor], weights: Sequence[float], lam: float = 1.0,
                    normalize: bool = False) -> torch.Tensor:
    """`lam * sum_i w_i tau_i`, divided by `sum_i w_i` when `normalize` (mergekit's semantics,
    including its rule that a weight sum of ~0 is left undivided).

    Iterates the deltas once and accumulates in their dtype, so a lazy sequence that reads each
    task vector from storage keeps only one of them alive.
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
