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

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from dist_svc.methods.base import (
    DENSITY, INT8_MASK, LAMBDA, SEED, WEIGHT, Extent, Param, Reduction, Where, drive, normalize, register, rescale,
    streams, whole,
)
from dist_svc.methods.random import stream_key, uniform

L1_EPS = 1e-7  # mergekit's: a norm below it is not rescaled


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """The first k of `values` (non-negative: magnitudes, variances) in the selection order:
    larger first, equal values by flat index, lowest first. The same choice on every device.

    The streaming selection (`select`) on the whole tensor as its one block: a radix selection
    on the values' bit patterns, no sort (a sort or torch.topk holds 3-5x the input)."""
    if values.dtype in (torch.float16, torch.bfloat16):
        values = values.float()  # exact, and the same order
    where = Where("", lambda: torch.arange(values.numel(), device=values.device).view(values.shape))
    extent = Extent("", tuple(values.shape), dtype=values.dtype)
    cuts = drive(lambda p, e: select(lambda tensors, where: [_bits(tensors[0])], [k], e), {}, extent,
                 lambda: [([values], where)])
    return Keeper(cuts)(0, _bits(values), where)


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}
_DIGIT = 16  # bits per radix pass: a float32 takes 2 passes, a float64 4
_RADIX = 1 << _DIGIT
_CHUNK = 1 << 22  # elements per bincount


def _bits(values: torch.Tensor) -> torch.Tensor:
    """Non-negative floats as integers of the same order (NaN above inf): their bit patterns."""
    return values.view(_BITS[values.dtype])


@dataclass(frozen=True)
class Cut:
    """Where a selection of the first k (of `numel`) ends: every key above `threshold`, and of
    the `tied` keys equal to it the first `need` by flat index; for blocks out of flat order,
    those up to flat index `last`."""

    k: int
    numel: int
    threshold: int = 0
    need: int = 0
    tied: int = 0
    last: int | None = None

    @property
    def trivial(self) -> bool:
        return self.k <= 0 or self.k >= self.numel

    @property
    def split(self) -> bool:
        """Whether the cut falls among equal keys (some of them kept, some not)."""
        return not self.trivial and 0 < self.need < self.tied


def select(keys_of: Callable[[list, Where], list[torch.Tensor]], ks, extent: Extent, first: Reduction | None = None,
           width: int | None = None):
    """The exact selection of the first k of each of several key sequences, streamed (a
    generator of reductions for `drive`, returning one `Cut` per selection). `keys_of(tensors,
    where)`: one block's keys per selection (non-negative integers, the flat order of the block).

    Radix selection, most significant digit first: one pass per 16 bits of the keys (2 for a
    float32's bits), each a histogram of the digit of the keys that match the digits chosen so
    far; the digit where the count from the top reaches k is chosen. The last histogram counts
    the keys equal to the k-th (`tied`). Blocks in flat order resolve a split tie while they are
    merged (`Keeper` counts the ties before each block); blocks out of order (columns) take two
    more passes, which select the `need`-th lowest flat index among the tied keys the same way.
    `first`: a reduction folded into the first pass, whose sum `ks(sum)` turns into the ks."""
    width = width or torch.finfo(extent.dtype).bits
    count = len(ks) if first is None else None
    prefix, remaining, tied = None, None, None
    shifts = range(width - _DIGIT, -1, -_DIGIT)
    cuts: list[Cut] = []
    for shift in shifts:
        chosen = tuple(prefix or ())

        def histograms(tensors, where, shift=shift, chosen=chosen):
            keys = keys_of(tensors, where)
            hist = torch.zeros(len(keys), _RADIX, dtype=torch.int64, device=keys[0].device if keys else None)
            high = shift + _DIGIT
            for j, key in enumerate(keys):
                if chosen and (remaining[j] is None):
                    continue  # a trivial selection
                key = key.reshape(-1)
                if high < width:
                    key = key[(key >> high) == (chosen[j] >> high)]
                for part in key.split(_CHUNK):
                    counts = torch.bincount(((part >> shift) & (_RADIX - 1)).int())
                    hist[j, :counts.shape[0]] += counts
            return hist if first is None or chosen else (first(tensors, where), hist)

        if remaining is not None and all(r is None for r in remaining):
            break  # every selection is trivial: no pass at all
        if remaining is None and first is None and all(k <= 0 or k >= extent.numel for k in ks):
            return [Cut(k, extent.numel) for k in ks]
        result = yield histograms
        if remaining is None:
            if first is not None:
                extra, result = result
                ks = ks(extra)
            count = len(ks)
            cuts = [Cut(k, extent.numel) for k in ks]
            prefix = [0] * count
            remaining = [None if cut.trivial else cut.k for cut in cuts]
            tied = [0] * count
        for j in range(count):
            if remaining[j] is None:
                continue
            hist = result[j]
            at_least = hist.flip(0).cumsum(0).flip(0)  # at_least[d]: keys whose digit is >= d
            digit = int(torch.nonzero(at_least >= remaining[j]).max())
            if digit + 1 < _RADIX:
                remaining[j] -= int(at_least[digit + 1])
            prefix[j] |= digit << shift
            tied[j] = int(hist[digit])
    if remaining is None:
        return cuts
    cuts = [cut if remaining[j] is None else replace(cut, threshold=prefix[j], need=remaining[j], tied=tied[j])
            for j, cut in enumerate(cuts)]
    if extent.ordered or not any(cut.split for cut in cuts):
        return cuts
    top = extent.numel - 1  # the lowest index is the largest key

    def tie_keys(tensors, where):
        index = where.indices().reshape(-1)
        return [top - index[key.reshape(-1) == cut.threshold] if cut.split else index[:0]
                for key, cut in zip(keys_of(tensors, where), cuts)]

    index_width = -(-max(top.bit_length(), 1) // _DIGIT) * _DIGIT
    lasts = yield from select(tie_keys, [cut.need if cut.split else 0 for cut in cuts],
                              replace(extent, ordered=True), width=index_width)
    return [replace(cut, last=top - last.threshold) if cut.split else cut for cut, last in zip(cuts, lasts)]


class Keeper:
    """Which keys of each block the cuts keep, the blocks given in order (one Keeper per pass
    over the blocks: it counts the ties seen before each block)."""

    def __init__(self, cuts: Sequence[Cut]):
        self.cuts = cuts
        self.seen = [0] * len(cuts)

    def __call__(self, j: int, key: torch.Tensor, where: Where) -> torch.Tensor:
        cut = self.cuts[j]
        if cut.k <= 0:
            return torch.zeros(key.shape, dtype=torch.bool, device=key.device)
        if cut.k >= cut.numel:
            return torch.ones(key.shape, dtype=torch.bool, device=key.device)
        keep = key > cut.threshold
        if cut.need == 0:
            return keep
        at = key == cut.threshold
        if cut.need >= cut.tied:
            return keep.logical_or_(at)
        if cut.last is not None:
            return keep.logical_or_(at.logical_and_(where.indices() <= cut.last))
        positions = at.reshape(-1).nonzero().squeeze(1)  # the block's ties, in flat order
        take = min(max(cut.need - self.seen[j], 0), positions.numel())
        self.seen[j] += positions.numel()
        if take == positions.numel():
            return keep.logical_or_(at)
        first = torch.zeros(at.numel(), dtype=torch.bool, device=at.device)
        first[positions[:take]] = True
        return keep.logical_or_(first.view(at.shape))


def pruning(windows: Sequence, rescale: bool, extent: Extent):
    """The magnitude pruning of TIES and breadcrumbs, streamed (a generator for `drive`): each
    task vector keeps a window of its selection order, `windows[i]`: "all" (density 1: the task
    vector itself), "none" (zeros), or `(lo, hi)`: positions lo <= r < hi of the order (larger
    magnitudes first, equal ones lowest flat index first). With `rescale` a windowed task vector
    is scaled back to its L1 norm (mergekit's `rescaled_masked_tensor`; not where either norm
    is below 1e-7): one more pass, of the norms. Returns the output pass's factory: `begin()`
    gives the function of a block's task vectors to their pruned blocks.

    Passes: 2 for the selection (4 with dtype float64), +1 with `rescale`, before the output."""
    selections = []  # (task, k): the first k of task's order
    for i, window in enumerate(windows):
        if isinstance(window, tuple):
            selections += [(i, window[1])] + ([(i, window[0])] if window[0] > 0 else [])

    def keys_of(taus, where):
        magnitudes = {i: _bits(taus[i].abs()) for i in {i for i, _ in selections}}  # one per task
        return [magnitudes[i] for i, _ in selections]

    cuts = yield from select(keys_of, [k for _, k in selections], extent)

    def prune(keeper: Keeper, taus, where) -> list[torch.Tensor]:
        keys, j, out = keys_of(taus, where), 0, []
        for tau, window in zip(taus, windows):
            if window == "all":
                out.append(tau)
            elif window == "none":
                out.append(torch.zeros_like(tau))
            else:
                keep = keeper(j, keys[j], where)
                if window[0] > 0:
                    keep &= ~keeper(j + 1, keys[j + 1], where)
                out.append(tau * keep)
                j += 1 + (window[0] > 0)
        return out

    scales: list[torch.Tensor | None] = [None] * len(windows)
    if rescale and selections:
        def norms(taus, where, keeper=Keeper(cuts)):
            kept = prune(keeper, taus, where)
            return torch.stack([torch.stack([t.abs().sum(dtype=torch.float64), k.abs().sum(dtype=torch.float64)])
                                for t, k in zip(taus, kept)])

        sums = (yield norms).cpu()
        for i, window in enumerate(windows):
            before, after = (torch.tensor(float(x), dtype=extent.dtype) for x in sums[i])
            if isinstance(window, tuple) and before >= L1_EPS and after >= L1_EPS:
                scales[i] = before / after

    def begin():
        keeper = Keeper(cuts)

        def pruned(taus, where):
            kept = prune(keeper, taus, where)
            return [k if scale is None else k * scale.to(k.device) for k, scale in zip(kept, scales)]

        return pruned

    return begin


def _top(density: float, numel: int):
    """TIES's window: the `max(1, int(density * numel))` largest magnitudes (any positive
    density keeps at least one, as mergekit does)."""
    if density >= 1:
        return "all"
    if density <= 0 or numel == 0:
        return "none"
    return (0, max(1, int(density * numel)))


def _outliers(density: float, gamma: float, numel: int):
    """Model Breadcrumbs' window: skip the first `int(gamma numel)` as outliers and keep the next
    `int(density numel)`; fewer outliers are skipped when the density needs them (mergekit's
    arithmetic)."""
    if density >= 1:
        return "all"
    target = int(density * numel)
    skip = min(int(gamma * numel), numel - target)
    return (skip, skip + target)


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
    return whole(ties_passes, deltas, p, where)


@streams("ties")
def ties_passes(p, extent):
    windows = [_top(d, extent.numel) for d in p["density"]]
    return (yield from _pruned_combine(p, extent, windows, consensus=True))


def _pruned_combine(p, extent, windows, consensus: bool):
    begin = yield from pruning(windows, p["rescale"], extent)

    def output():
        pruned = begin()
        return lambda taus, where: combine(pruned(taus, where), p["weight"], p["lambda"], p["normalize"], consensus)

    return output


_CHUNK_ELEMENTS = 1 << 13  # a CPU piece: its temporaries stay in cache, each op runs on one thread


def by_rows(fn: Callable[[list, torch.Tensor], torch.Tensor], deltas: list, indices: torch.Tensor) -> torch.Tensor:
    """`fn(deltas, indices)` on a CPU block, computed on pieces of whole rows of ~8K elements
    (along axis 0; a 1-D tensor is one row) and put together: the same values for a function of
    each row alone. DARE and DELLA make ~30 elementwise passes per task (the counter-based hash,
    the drop, the sign election): over a block each goes to memory and through torch's thread
    pool, whose barrier waits for every thread (on a loaded machine, for a descheduled one);
    over a piece, below torch's parallel grain (32768 elements) even stacked, they stay in cache
    on one thread (measured: DARE-TIES 2.4-3x, DELLA 1.3-1.6x faster per block, 2 cores loaded)."""
    first = deltas[0]
    rows = max(1, _CHUNK_ELEMENTS // max(1, first[0].numel())) if first.ndim > 1 else 0
    if first.device.type != "cpu" or rows == 0 or rows >= first.shape[0]:
        return fn(deltas, indices)
    out = None
    for start in range(0, first.shape[0], rows):
        part = fn([t[start:start + rows] for t in deltas], indices[start:start + rows])
        if out is None:
            out = torch.empty(first.shape, dtype=part.dtype)
        out[start:start + rows] = part
    return out


def _dare(deltas, p, where, consensus: bool):
    keys = [stream_key(p["seed"], where.name, i) for i in range(len(deltas))]

    def merged(taus, indices):
        dropped = [random_drop(t, d, key, indices, p["rescale"]) for t, d, key in zip(taus, p["density"], keys)]
        return combine(dropped, p["weight"], p["lambda"], p["normalize"], consensus)

    return by_rows(merged, deltas, where.indices())


@register("dare_linear", *_gta(False, True, SEED), random=True, sample={"weight": 1.0, "density": 0.5},
          reference="https://arxiv.org/abs/2311.03099")
def dare_linear(deltas, p, where):
    return _dare(deltas, p, where, consensus=False)


@register("dare_ties", *_gta(False, True, SEED), random=True, sample={"weight": 1.0, "density": 0.5},
          reference="https://arxiv.org/abs/2311.03099")
def dare_ties(deltas, p, where):
    return _dare(deltas, p, where, consensus=True)


def _breadcrumbs(p, extent, consensus: bool):
    windows = [_outliers(d, g, extent.numel) for d, g in zip(p["density"], p["gamma"])]
    return (yield from _pruned_combine(p, extent, windows, consensus))


@register("breadcrumbs", *_gta(False, False, GAMMA), needs="tensor",
          sample={"weight": 1.0, "density": 0.8, "gamma": 0.02}, reference="https://arxiv.org/abs/2312.06795")
def breadcrumbs(deltas, p, where):
    return whole(breadcrumbs_passes, deltas, p, where)


@streams("breadcrumbs")
def breadcrumbs_passes(p, extent):
    return (yield from _breadcrumbs(p, extent, consensus=False))


@register("breadcrumbs_ties", *_gta(False, False, GAMMA), needs="tensor",
          sample={"weight": 1.0, "density": 0.8, "gamma": 0.02}, reference="https://arxiv.org/abs/2312.06795")
def breadcrumbs_ties(deltas, p, where):
    return whole(breadcrumbs_ties_passes, deltas, p, where)


@streams("breadcrumbs_ties")
def breadcrumbs_ties_passes(p, extent):
    return (yield from _breadcrumbs(p, extent, consensus=True))


def _della_bounds(p) -> str | None:
    for i, (d, e) in enumerate(zip(p["density"], p["epsilon"])):
        if 0 < d < 1 and not (0 < d - e and d + e < 1):
            return (f"density {d:g} and epsilon {e:g} of model {i + 1} give keep probabilities outside (0, 1); "
                    f"choose epsilon < min(density, 1 - density)")
    return None


def _della(deltas, p, where, consensus: bool):
    keys = [stream_key(p["seed"], where.name, i) for i in range(len(deltas))]

    def merged(taus, indices):
        pruned = [magprune(t, d, e, key, indices, p["rescale"])
                  for t, d, e, key in zip(taus, p["density"], p["epsilon"], keys)]
        return combine(pruned, p["weight"], p["lambda"], p["normalize"], consensus)

    return by_rows(merged, deltas, where.indices())


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
    return whole(sce_passes, deltas, p, where)


@streams("sce")
def sce_passes(p, extent):
    """mergekit's SCE: select by variance, elect signs, weight each task by its mean square.
    Passes: the selection (2, 4 with dtype float64; none with select_topk 1), the tasks' mean
    squares (1), the output."""
    density = p["select_topk"]
    cuts = None
    if density < 1:
        if density <= 0:
            cuts = [Cut(0, extent.numel)]
        else:  # k = count_nonzero(var) * density, a tensor product rounded as mergekit's
            cuts = yield from select(lambda taus, where: [_bits(_variance(taus))], lambda nonzero: [int(nonzero * density)],
                                     extent, first=lambda taus, where: torch.count_nonzero(_variance(taus)))

    def selected(keeper, taus, where):
        tvs = torch.stack(taus)
        return tvs if cuts is None else tvs * keeper(0, _bits(_variance(taus)), where).unsqueeze(0)

    def squares(taus, where, keeper=Keeper(cuts or ())):
        return selected(keeper, taus, where).square().reshape(len(taus), -1).sum(dim=1, dtype=torch.float64)

    means = ((yield squares) / extent.numel).to(extent.dtype)
    total = float(means.sum())
    weights = torch.ones_like(means) / means.shape[0] if abs(total) < 1e-6 else means / total

    def begin():
        keeper = Keeper(cuts or ())

        def output(taus, where):
            tvs = selected(keeper, taus, where)
            erase = tvs.sign() == sign_majority(tvs)
            erased = weights.to(tvs.device).view(-1, *([1] * (tvs.ndim - 1))) * erase
            return (tvs * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)

        return output

    return begin


_VARIANCE_CHUNK = 1 << 15  # elements per step of the variance on a CPU: its float64 temporaries stay in cache


def _variance(taus) -> torch.Tensor:
    """`torch.var(torch.stack(taus), dim=0, unbiased=False).abs()` (mergekit's SCE), bit for bit
    as torch computes it on a CPU: Welford's update in float64, one task after the other, rounded
    to the tasks' dtype once. torch's own kernel takes ~15x longer on a CPU (one element at a
    time), and SCE computes the variance in each of its passes; on a GPU this is the CPU's value
    (the same selection on every device), where torch.var would accumulate in float32."""
    out = torch.empty(taus[0].shape, dtype=taus[0].dtype, device=taus[0].device)
    flat, into = [t.reshape(-1) for t in taus], out.view(-1)
    step = _VARIANCE_CHUNK if out.device.type == "cpu" else max(1, into.numel())
    for start in range(0, into.numel(), step):
        mean = m2 = 0.0
        for n, tau in enumerate(flat, 1):
            x = tau[start:start + step].to(torch.float64, copy=True)
            delta = x - mean
            mean = delta / n + mean  # mean + delta / n, in Welford's order of rounding
            m2 = x.sub_(mean).mul_(delta).add_(m2)
        into[start:start + step] = m2.div_(len(flat))
    return out.abs_()
