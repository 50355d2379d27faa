"""The sparsify-then-combine family, with mergekit 0.1.5's semantics:

    ties              each task vector's top-`density` magnitudes, sign election by summed mass,
                      mean over the agreeing entries (normalize: divided by their summed weights)
    dare_linear       each entry kept with probability `density`, kept ones divided by it; weighted sum
    dare_ties         DARE's drop, then TIES's sign election
    breadcrumbs       drop the `gamma` largest and the smallest magnitudes, keep `density`; weighted sum
    breadcrumbs_ties  breadcrumbs' selection, then TIES's sign election
    della_linear      DELLA's MAGPRUNE: keep probability rising with the magnitude's rank in its row,
                      from density - epsilon to density + epsilon; kept ones divided by it; weighted sum
    della             MAGPRUNE, then TIES's sign election
    sce               select the top `select_topk` entries by variance across tasks, elect signs,
                      weight each task by its mean squared entry

Weighted task vectors are `w_i tau_i`; the result is multiplied by `lambda` (SCE has neither).
Where ties between equal magnitudes decide what is kept, the lower flat index wins (mergekit's
torch.argsort leaves that to the sort implementation; docs/methods.md).
"""

from __future__ import annotations

from typing import Sequence

import torch

from dist_svc.methods.base import (
    DENSITY, INT8_MASK, LAMBDA, SEED, WEIGHT, Param, normalize, register, rescale,
)
from dist_svc.methods.random import stream_key, uniform

L1_EPS = 1e-7  # mergekit's: a norm below it is not rescaled


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest of `values` (flat), ties at the threshold going to the lowest indices: the
    same choice on every device and for every sort implementation."""
    flat = values.reshape(-1)
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k <= 0:
        return keep.view_as(values)
    if k >= flat.numel():
        return keep.fill_(True).view_as(values)
    threshold = torch.topk(flat, k, sorted=False).values.min()
    above = flat > threshold
    at = flat == threshold
    need = k - int(above.sum())
    return (above | (at & (torch.cumsum(at, 0) <= need))).view_as(values)


def l1_rescaled(tau: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """mergekit's `rescaled_masked_tensor` with the L1 norm: what was kept, scaled back to the
    task vector's L1 norm (unless either norm is below 1e-7)."""
    before = tau.abs().sum()
    after = kept.abs().sum()
    if before < L1_EPS or after < L1_EPS:
        return kept
    return kept * (before / after)


def magnitude_prune(tau: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the `max(1, int(density * numel))` entries of largest magnitude (any positive density
    keeps at least one, as mergekit does), zero the rest."""
    if density >= 1:
        return tau
    if density <= 0 or tau.numel() == 0:
        return torch.zeros_like(tau)
    kept = tau * top_k_mask(tau.abs(), max(1, int(density * tau.numel())))
    return l1_rescaled(tau, kept) if rescale else kept


def magnitude_outliers(tau: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Model Breadcrumbs: in ascending order of magnitude (ties: lower index first), skip the
    smallest `numel - int(density numel) - int(gamma numel)` and keep the next `int(density numel)`,
    so the `gamma` largest are dropped as outliers (fewer when the density needs them)."""
    if density >= 1:
        return tau
    n = tau.numel()
    target = int(density * n)
    bottom = max(0, n - target - int(gamma * n))
    order = torch.sort(tau.abs().reshape(-1), stable=True).indices
    keep = torch.zeros(n, dtype=torch.bool, device=tau.device)
    keep[order[bottom:bottom + target]] = True
    kept = tau * keep.view_as(tau)
    return l1_rescaled(tau, kept) if rescale else kept


def random_drop(tau: torch.Tensor, density: float, key: tuple[int, int], indices: torch.Tensor,
                rescale: bool = True) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (decided by its index, see
    methods.random) and, with `rescale`, divide the kept ones by `density` so the expectation is
    unchanged."""
    if density >= 1:
        return tau
    keep = uniform(key, indices.to(tau.device)) < density
    out = tau * keep
    return out / density if rescale else out


def magprune(tau: torch.Tensor, density: float, epsilon: float, key: tuple[int, int], indices: torch.Tensor,
             rescale: bool = True) -> torch.Tensor:
    """DELLA's MAGPRUNE on a block of whole rows: in each row (along axis 1; a 1-D tensor is one
    row) the entries are ranked by magnitude (ties: lower index first), rank r of n gets keep
    probability `density - epsilon + 2 epsilon (r - 1) / (n - 1)` (a row of one entry: `density`),
    and each entry is kept when its counter-based uniform number is below it; with `rescale` a
    kept entry is divided by its keep probability."""
    if density >= 1:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    rows = tau.unsqueeze(0) if tau.ndim < 2 else tau
    n = rows.shape[1]
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=tau.device).expand_as(order).clone())
    rank_norm = ranks.to(torch.float64) / (n - 1) if n > 1 else torch.full(rows.shape, 0.5, dtype=torch.float64,
                                                                             device=tau.device)
    probability = (density - epsilon) + rank_norm * (2 * epsilon)
    keep = uniform(key, indices.to(tau.device).reshape(rows.shape)) < probability
    out = torch.where(keep, rows / probability.to(rows.dtype) if rescale else rows, torch.zeros_like(rows))
    return out.reshape(tau.shape)


def combine(deltas: Sequence[torch.Tensor], weights: Sequence[float], lam: float, normalize: bool,
            consensus: bool) -> torch.Tensor:
    """mergekit's generalized task arithmetic after sparsification."""
    stack = torch.stack(list(deltas))
    w = torch.tensor(list(weights), dtype=stack.dtype, device=stack.device).view(-1, *([1] * (stack.ndim - 1)))
    weighted = stack * w
    if consensus:
        agree = weighted.sign() == sign_majority(weighted)
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


def sign_majority(stack: torch.Tensor) -> torch.Tensor:
    """TIES's elected sign per entry: that of the summed mass (+1 where it is 0)."""
    return torch.where(stack.sum(dim=0) >= 0, 1.0, -1.0).to(stack.dtype)


# -- registrations --------------------------------------------------------------------------------

GAMMA = Param("gamma", 0.01, float, 0.0, 1.0, low_inclusive=True, scope="model",
              doc="fraction of the largest magnitudes dropped as outliers")
EPSILON = Param("epsilon", 0.15, float, 0.0, 1.0, low_inclusive=True, scope="model",
                doc="spread of the keep probabilities around density")


def _gta(normalize_default: bool, rescale_default: bool, *extra: Param) -> tuple[Param, ...]:
    return (LAMBDA, normalize(normalize_default), rescale(rescale_default), INT8_MASK, WEIGHT, DENSITY, *extra)


@register("ties", *_gta(True, False), needs="tensor", reference="https://arxiv.org/abs/2306.01708")
def ties(deltas, p, where):
    pruned = [magnitude_prune(t, d, p["rescale"]) for t, d in zip(deltas, p["density"])]
    return combine(pruned, p["weight"], p["lambda"], p["normalize"], consensus=True)


def _dare(deltas, p, where, consensus: bool):
    indices = where.indices()
    dropped = [random_drop(t, d, stream_key(p["seed"], where.name, i), indices, p["rescale"])
               for i, (t, d) in enumerate(zip(deltas, p["density"]))]
    return combine(dropped, p["weight"], p["lambda"], p["normalize"], consensus)


@register("dare_linear", *_gta(False, True, SEED), random=True, reference="https://arxiv.org/abs/2311.03099")
def dare_linear(deltas, p, where):
    return _dare(deltas, p, where, consensus=False)


@register("dare_ties", *_gta(False, True, SEED), random=True, reference="https://arxiv.org/abs/2311.03099")
def dare_ties(deltas, p, where):
    return _dare(deltas, p, where, consensus=True)


def _breadcrumbs(deltas, p, consensus: bool):
    kept = [magnitude_outliers(t, d, g, p["rescale"]) for t, d, g in zip(deltas, p["density"], p["gamma"])]
    return combine(kept, p["weight"], p["lambda"], p["normalize"], consensus)


@register("breadcrumbs", *_gta(False, False, GAMMA), needs="tensor", reference="https://arxiv.org/abs/2312.06795")
def breadcrumbs(deltas, p, where):
    return _breadcrumbs(deltas, p, consensus=False)


@register("breadcrumbs_ties", *_gta(False, False, GAMMA), needs="tensor",
          reference="https://arxiv.org/abs/2312.06795")
def breadcrumbs_ties(deltas, p, where):
    return _breadcrumbs(deltas, p, consensus=True)


def _della_bounds(p) -> str | None:
    for i, (d, e) in enumerate(zip(p["density"], p["epsilon"])):
        if 0 < d < 1 and not (0 < d - e and d + e < 1):
            return (f"density {d:g} and epsilon {e:g} of model {i + 1} give keep probabilities outside (0, 1); "
                    f"choose epsilon < min(density, 1 - density)")
    return None


def _della(deltas, p, where, consensus: bool):
    indices = where.indices()
    pruned = [magprune(t, d, e, stream_key(p["seed"], where.name, i), indices, p["rescale"])
              for i, (t, d, e) in enumerate(zip(deltas, p["density"], p["epsilon"]))]
    return combine(pruned, p["weight"], p["lambda"], p["normalize"], consensus)


@register("della", *_gta(True, True, EPSILON, SEED), needs="row", random=True, check=_della_bounds,
          reference="https://arxiv.org/abs/2406.11617")
def della(deltas, p, where):
    return _della(deltas, p, where, consensus=True)


@register("della_linear", *_gta(False, True, EPSILON, SEED), needs="row", random=True, check=_della_bounds,
          reference="https://arxiv.org/abs/2406.11617")
def della_linear(deltas, p, where):
    return _della(deltas, p, where, consensus=False)


@register("sce", INT8_MASK, Param("select_topk", 1.0, float, 0.0, 1.0, low_inclusive=True,
                                  doc="fraction of entries kept, by variance across the tasks"),
          needs="tensor", reference="https://arxiv.org/abs/2408.07990")
def sce(deltas, p, where):
    """mergekit's SCE: select by variance, elect signs, weight each task by its mean square."""
    tvs = torch.stack(deltas)
    if p["select_topk"] < 1:
        tvs = tvs * _variance_mask(tvs, p["select_topk"]).unsqueeze(0)
    erase = tvs.sign() == sign_majority(tvs)
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = float(weights.sum())
    weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total
    erased = weights.view(-1, *([1] * (tvs.ndim - 1))) * erase
    return (tvs * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)


def _variance_mask(tvs: torch.Tensor, density: float) -> torch.Tensor:
    if density <= 0:
        return torch.zeros_like(tvs[0], dtype=torch.bool)
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)  # a tensor product, rounded as mergekit's
    return top_k_mask(var.abs(), k)
