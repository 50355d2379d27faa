"""TIES and DARE: the sparsify-then-combine family, with mergekit's semantics.

    ties         top-`density` magnitudes of each task vector, sign election by summed mass,
                 mean over the agreeing entries (normalize: divide by their summed weights)
    dare_linear  drop each entry with probability 1 - density, rescale by 1/density, weighted sum
    dare_ties    DARE's drop, then TIES's sign election

Weighted task vectors are `w_i tau_i`; the result is multiplied by `lambda`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dist_svc.methods.random import stream_key, uniform


def magnitude_prune(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `int(density * numel)` entries of largest magnitude, zero the rest."""
    if density >= 1:
        return tau
    k = int(density * tau.numel())
    if k <= 0:
        return torch.zeros_like(tau)
    keep = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    keep[torch.topk(tau.abs().reshape(-1), k, sorted=False).indices] = True
    return tau * keep.view_as(tau)


def random_drop(tau: torch.Tensor, density: float, key: tuple[int, int], indices: torch.Tensor,
                rescale: bool = True) -> torch.Tensor:
    """Keep each entry with probability `density` (decided by its index, see methods.random)
    and, with `rescale`, divide the kept ones by `density` so the expectation is unchanged."""
    if density >= 1:
        return tau
    keep = uniform(key, indices.to(tau.device)) < density
    out = tau * keep
    return out / density if rescale else out


def combine(deltas: Sequence[torch.Tensor], weights: Sequence[float], lam: float, normalize: bool,
            consensus: bool) -> torch.Tensor:
    """mergekit's generalized task arithmetic after sparsification."""
    stack = torch.stack(list(deltas))
    w = torch.tensor(list(weights), dtype=stack.dtype, device=stack.device).view(-1, *([1] * (stack.ndim - 1)))
    weighted = stack * w
    if consensus:
        majority = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(stack.dtype)
        agree = weighted.sign() == majority
        mixed = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return mixed * lam


def ties(deltas, weights, densities, lam: float = 1.0, normalize: bool = True) -> torch.Tensor:
    pruned = [magnitude_prune(t, d) for t, d in zip(deltas, densities)]
    return combine(pruned, weights, lam, normalize, consensus=True)


def dare(deltas, weights, densities, name: str, indices: torch.Tensor, seed: int, lam: float = 1.0,
         normalize: bool = False, rescale: bool = True, consensus: bool = False) -> torch.Tensor:
    dropped = [random_drop(t, d, stream_key(seed, name, i), indices, rescale)
               for i, (t, d) in enumerate(zip(deltas, densities))]
    return combine(dropped, weights, lam, normalize, consensus)
