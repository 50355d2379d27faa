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

Selection by magnitude has one order (`top_k_mask`): larger magnitudes first and, among equal
magnitudes, the lower flat index first. TIES keeps the first k of it, breadcrumbs a window of it,
SCE the first k by variance, DELLA ranks by it. mergekit's torch.argsort/topk leave the order of
equal magnitudes to the sort implementation (docs/methods.md); bf16 task vectors hold many.
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
    """The first k of `values` (non-negative: magnitudes, variances) in the selection order:
    larger first, equal values by flat index, lowest first. The same choice on every device.

    Found without sorting, as a streaming selection would: the k-th largest by a radix selection
    on the values' bit patterns (`_kth_largest_bits`), every value above it, and of those equal to
    it the first `k - above` by index (`_first_true`). Beside the input it holds a few boolean
    masks and one chunk of digits; a sort or torch.topk holds 3-5x the input."""
    flat = values.reshape(-1)
    if k <= 0:
        return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    if k >= flat.numel():
        return torch.ones(values.shape, dtype=torch.bool, device=values.device)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()  # exact, and the same order
    bits = flat.view(_BITS[flat.dtype])  # for non-negative floats, ordered as the values (NaN above inf)
    threshold = _kth_largest_bits(bits, k)
    keep = bits > threshold
    need = k - int(torch.count_nonzero(keep))
    at = bits == threshold
    keep |= _first_true(at, need)
    return keep.view(values.shape)


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}
_DIGIT = 16  # bits per radix pass: a float32 takes 2 passes, a float64 4
_CHUNK = 1 << 22  # elements per step of a pass over the whole input


def _kth_largest_bits(bits: torch.Tensor, k: int) -> int:
    """The k-th largest (1-based) of non-negative integers, most significant digit first: a
    histogram of the candidates' digit, the digit where the count from the top reaches k, and
    only the candidates with that digit go on to the next pass."""
    prefix, remaining, candidates = 0, k, bits
    for shift in range(bits.element_size() * 8 - _DIGIT, -1, -_DIGIT):
        hist = torch.zeros(1 << _DIGIT, dtype=torch.int64, device=bits.device)
        for part in candidates.split(_CHUNK):
            hist += torch.bincount(((part >> shift) & ((1 << _DIGIT) - 1)).int(), minlength=1 << _DIGIT)
        at_least = hist.flip(0).cumsum(0).flip(0)  # at_least[d]: candidates whose digit is >= d
        digit = int(torch.nonzero(at_least >= remaining).max())
        if digit + 1 < 1 << _DIGIT:
            remaining -= int(at_least[digit + 1])
        prefix |= digit << shift
        if shift:
            candidates = torch.cat([part[((part >> shift) & ((1 << _DIGIT) - 1)) == digit]
                                    for part in candidates.split(_CHUNK)])
    return prefix


def _first_true(mask: torch.Tensor, count: int) -> torch.Tensor:
    """`mask` with only its first `count` True entries (by index) left True (1-D; modified)."""
    if count <= 0:
        return mask.zero_()
    counts = torch.stack([torch.count_nonzero(part) for part in mask.split(_CHUNK)]).cumsum(0)
    chunk = int(torch.searchsorted(counts, count))  # the chunk holding the count-th True
    before = int(counts[chunk - 1]) if chunk else 0
    part = mask[chunk * _CHUNK:(chunk + 1) * _CHUNK]
    last = chunk * _CHUNK + int(torch.nonzero(part)[count - before - 1])
    mask[last + 1:] = False
    return mask


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
    """Model Breadcrumbs: in the selection order (larger magnitudes first, equal ones lowest index
    first), skip the first `int(gamma numel)` as outliers and keep the next `int(density numel)`;
    fewer outliers are skipped when the density needs them (mergekit's arithmetic)."""
    if density >= 1:
        return tau
    n = tau.numel()
    target = int(density * n)
    skip = min(int(gamma * n), n - target)
    magnitudes = tau.abs()
    keep = top_k_mask(magnitudes, skip + target)
    keep &= ~top_k_mask(magnitudes, skip)
    kept = tau * keep
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
    row) the entries are ranked in the selection order (`top_k_mask`: of equal magnitudes the
    lower index ranks higher), rank r of n (1: the smallest) gets keep probability
    `density - epsilon + 2 epsilon (r - 1) / (n - 1)` (a row of one entry: `density`), and each
    entry is kept when its counter-based uniform number is below it; with `rescale` a
    kept entry is divided by its keep probability."""
    if density >= 1:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    rows = tau.unsqueeze(0) if tau.ndim < 2 else tau
    n = rows.shape[1]
    order = torch.sort(rows.abs(), dim=1, descending=True, stable=True).indices
    descending = torch.arange(n - 1, -1, -1, device=tau.device).expand_as(order).clone()
    ranks = torch.empty_like(order).scatter_(1, order, descending)
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


@register("ties", *_gta(True, False), needs="tensor", sample={"weight": 1.0, "density": 0.5},
          reference="https://arxiv.org/abs/2306.01708")
def ties(deltas, p, where):
    pruned = [magnitude_prune(t, d, p["rescale"]) for t, d in zip(deltas, p["density"])]
    return combine(pruned, p["weight"], p["lambda"], p["normalize"], consensus=True)


def _dare(deltas, p, where, consensus: bool):
    indices = where.indices()
    dropped = [random_drop(t, d, stream_key(p["seed"], where.name, i), indices, p["rescale"])
               for i, (t, d) in enumerate(zip(deltas, p["density"]))]
    return combine(dropped, p["weight"], p["lambda"], p["normalize"], consensus)


@register("dare_linear", *_gta(False, True, SEED), random=True, sample={"weight": 1.0, "density": 0.5},
          reference="https://arxiv.org/abs/2311.03099")
def dare_linear(deltas, p, where):
    return _dare(deltas, p, where, consensus=False)


@register("dare_ties", *_gta(False, True, SEED), random=True, sample={"weight": 1.0, "density": 0.5},
          reference="https://arxiv.org/abs/2311.03099")
def dare_ties(deltas, p, where):
    return _dare(deltas, p, where, consensus=True)


def _breadcrumbs(deltas, p, consensus: bool):
    kept = [magnitude_outliers(t, d, g, p["rescale"]) for t, d, g in zip(deltas, p["density"], p["gamma"])]
    return combine(kept, p["weight"], p["lambda"], p["normalize"], consensus)


@register("breadcrumbs", *_gta(False, False, GAMMA), needs="tensor",
          sample={"weight": 1.0, "density": 0.8, "gamma": 0.02}, reference="https://arxiv.org/abs/2312.06795")
def breadcrumbs(deltas, p, where):
    return _breadcrumbs(deltas, p, consensus=False)


@register("breadcrumbs_ties", *_gta(False, False, GAMMA), needs="tensor",
          sample={"weight": 1.0, "density": 0.8, "gamma": 0.02}, reference="https://arxiv.org/abs/2312.06795")
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
          sample={"weight": 1.0, "density": 0.5, "epsilon": 0.1}, reference="https://arxiv.org/abs/2406.11617")
def della(deltas, p, where):
    return _della(deltas, p, where, consensus=True)


@register("della_linear", *_gta(False, True, EPSILON, SEED), needs="row", random=True, check=_della_bounds,
          sample={"weight": 1.0, "density": 0.5, "epsilon": 0.1}, reference="https://arxiv.org/abs/2406.11617")
def della_linear(deltas, p, where):
    return _della(deltas, p, where, consensus=False)


@register("sce", INT8_MASK, Param("select_topk", 1.0, float, 0.0, 1.0, low_inclusive=True,
                                  doc="fraction of entries kept, by variance across the tasks"),
          needs="tensor", sample={"select_topk": 0.5}, reference="https://arxiv.org/abs/2408.07990")
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
