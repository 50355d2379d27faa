"""Float64 references, written from the definitions (docs/calibration.md, mergekit), independent of
the product's code paths: numpy instead of torch, a loop over ranks instead of batched products."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from dist_svc.methods.sparse import L1_EPS, combine, sign_majority


def svc_reference(wm: np.ndarray, taus: list[np.ndarray], alpha: float, side: str = "column",
                  target: int | None = None) -> np.ndarray:
    """Calibrated delta of Wm, one singular direction at a time, in float64."""
    wm = np.asarray(wm, dtype=np.float64)
    u, s, vt = np.linalg.svd(wm, full_matrices=False)
    out = np.zeros_like(wm)
    for r in range(len(s)):
        if side == "column":
            a_m = u[:, r] @ wm
            a_tasks = [u[:, r] @ np.asarray(t, np.float64) for t in taus]
        else:
            a_m = wm @ vt[r]
            a_tasks = [np.asarray(t, np.float64) @ vt[r] for t in taus]
        if s[r] <= 1e-6 * s[0]:  # the null space (by definition): eta = 1
            out += s[r] * np.outer(u[:, r], vt[r])
            continue
        scores = [float(a_m @ a) / max(float(a @ a), 1e-12) for a in a_tasks]
        if target is None:
            eta = float(np.mean([max(x, alpha) for x in scores]))
        else:
            eta = max(scores[target], alpha) if scores[target] > 0 else 1.0
        out += (s[r] / eta) * np.outer(u[:, r], vt[r])
    return out


def load_checkpoint(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF checkpoint directory as float64 numpy arrays."""
    out = {}
    files = sorted(Path(path).glob("*.safetensors"))
    for f in files:
        for name, t in load_file(str(f)).items():
            out[name] = t.to(torch.float64).numpy()
    return out


def merge_reference(base_dir: Path, ft_dirs: list[Path], weights: list[float], lam: float = 1.0,
                    normalize: bool = False, calibrate: bool = True, alpha: float | None = None,
                    skip: tuple[str, ...] = ("*embed*", "*wte*", "*wpe*", "*lm_head*"),
                    method=None, weights_method=None) -> dict[str, np.ndarray]:
    """base + base method (TA unless `method(name, taus)` gives the merged delta, or
    `weights_method(name, base, fine_tunes)` the merged weights) + SVC on 2-D, non-skipped
    tensors, all in float64."""
    base = load_checkpoint(base_dir)
    fts = [load_checkpoint(d) for d in ft_dirs]
    k = len(fts)
    alpha = 1.0 / k if alpha is None else alpha
    out = {}
    for name, b in base.items():
        taus = [ft[name] - b for ft in fts]
        if weights_method is not None:
            wm = weights_method(name, b, [ft[name] for ft in fts]) - b
        elif method is not None:
            wm = method(name, taus)
        else:
            wm = sum(w * t for w, t in zip(weights, taus))
            if normalize:
                wm = wm / sum(weights)
            wm = lam * wm
        if calibrate and b.ndim == 2 and not any(fnmatch.fnmatchcase(name, p) for p in skip):
            wm = svc_reference(wm, taus, alpha)
        out[name] = b + wm
    return out


def load_output(out_dir: Path) -> dict[str, torch.Tensor]:
    """The merged checkpoint through its index (or its single model.safetensors), exactly as stored."""
    if not (Path(out_dir) / "model.safetensors.index.json").exists():
        return load_file(str(Path(out_dir) / "model.safetensors"))
    index = json.loads((Path(out_dir) / "model.safetensors.index.json").read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(Path(out_dir) / fname)))
    assert set(out) == set(index["weight_map"])
    return out


# -- base methods, from their definitions (numpy, float64) -------------------------------------

def ties_reference(taus, weights, densities, lam=1.0, normalize=True):
    """mergekit's TIES: magnitude top-k per task, sign election by summed weighted mass, mean of
    the agreeing weighted entries."""
    pruned = []
    for t, d in zip(taus, densities):
        t = np.asarray(t, np.float64)
        if d < 1:
            k = int(d * t.size)
            order = np.argsort(-np.abs(t).ravel(), kind="stable")
            mask = np.zeros(t.size, bool)
            mask[order[:k]] = True
            t = t * mask.reshape(t.shape)
        pruned.append(t)
    weighted = np.stack([w * t for w, t in zip(weights, pruned)])
    majority = np.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(weighted) == majority
    mixed = (weighted * agree).sum(0)
    divisor = (np.array(weights).reshape(-1, *[1] * (weighted.ndim - 1)) * agree).sum(0)
    divisor[divisor == 0] = 1
    return lam * (mixed / divisor if normalize else mixed)


def _polar_np(x):
    p, _, qt = np.linalg.svd(x, full_matrices=False)
    return p @ qt


def tsv_reference(taus, lam=1.0):
    taus = [np.asarray(t, np.float64) for t in taus]
    if taus[0].ndim != 2:
        return lam * np.mean(taus, axis=0)
    keep = max(1, min(taus[0].shape) // len(taus))
    parts = [np.linalg.svd(t, full_matrices=False) for t in taus]
    u = np.concatenate([p[0][:, :keep] for p in parts], axis=1)
    s = np.concatenate([p[1][:keep] for p in parts])
    v = np.concatenate([p[2][:keep].T for p in parts], axis=1)
    return lam * (_polar_np(u) @ np.diag(s) @ _polar_np(v).T)


def iso_c_reference(taus, lam=1.0):
    total = np.sum([np.asarray(t, np.float64) for t in taus], axis=0)
    if total.ndim != 2:
        return lam * total
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    return lam * s.mean() * (u @ vt)


def iso_cts_reference(taus, lam=1.0, common_fraction=0.8):
    taus = [np.asarray(t, np.float64) for t in taus]
    total = np.sum(taus, axis=0)
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    common = int(common_fraction * len(s))
    per = (len(s) - common) // len(taus)
    us, vs = [u[:, :common]], [vt[:common].T]
    proj = u[:, :common] @ u[:, :common].T
    for t in taus:
        ur, _, vrt = np.linalg.svd(t - proj @ t, full_matrices=False)
        us.append(ur[:, :per])
        vs.append(vrt[:per].T)
    return lam * s.mean() * (_polar_np(np.concatenate(us, 1)) @ _polar_np(np.concatenate(vs, 1)).T)


def star_reference(taus, lam=1.0, eta=0.4):
    out = []
    for t in taus:
        t = np.asarray(t, np.float64)
        u, s, vt = np.linalg.svd(t, full_matrices=False)
        total = s.sum()
        rank = next(r for r in range(1, len(s) + 1) if s[:r].sum() >= eta * total - 1e-12 * total)
        kept = s[:rank] * total / s[:rank].sum()
        out.append(u[:, :rank] @ np.diag(kept) @ vt[:rank])
    return lam * np.mean(out, axis=0)


# -- mergekit 0.1.5's other methods, from their definitions (numpy, float64) ------------------------

def _keep_top(values: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the k largest values; equal values ordered by index (lowest first)."""
    order = sorted(range(values.size), key=lambda i: (-values.flat[i], i))
    mask = np.zeros(values.size, bool)
    mask[order[:k]] = True
    return mask.reshape(values.shape)


def _l1_rescale(tau, kept):
    before, after = np.abs(tau).sum(), np.abs(kept).sum()
    return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)


def magnitude_reference(tau, density, rescale=False):
    """TIES's pruning: the max(1, int(density n)) largest magnitudes (ties: lowest index)."""
    tau = np.asarray(tau, np.float64)
    if density >= 1:
        return tau
    if density <= 0:
        return np.zeros_like(tau)
    kept = tau * _keep_top(np.abs(tau), max(1, int(density * tau.size)))
    return _l1_rescale(tau, kept) if rescale else kept


def breadcrumbs_prune_reference(tau, density, gamma, rescale=False):
    """Model Breadcrumbs: drop the int(gamma n) largest magnitudes and the smallest, keeping
    int(density n) (fewer outliers dropped when the density needs them); equal magnitudes
    ordered by index, the lowest counting as the larger."""
    tau = np.asarray(tau, np.float64)
    if density >= 1:
        return tau
    n = tau.size
    target, top = int(density * n), int(gamma * n)
    skip = min(top, n - target)
    descending = sorted(range(n), key=lambda i: (-abs(tau.flat[i]), i))
    mask = np.zeros(n, bool)
    mask[descending[skip:skip + target]] = True
    kept = tau * mask.reshape(tau.shape)
    return _l1_rescale(tau, kept) if rescale else kept


def gta_reference(pruned, weights, lam=1.0, normalize=False, consensus=False):
    """mergekit's generalized task arithmetic after sparsification."""
    w = np.array(weights, np.float64).reshape(-1, *[1] * np.ndim(pruned[0]))
    weighted = np.stack([np.asarray(t, np.float64) for t in pruned]) * w
    if consensus:
        majority = np.where(weighted.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(weighted) == majority
        mixed, divisor = (weighted * agree).sum(0), (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = weighted.sum(0), np.broadcast_to(w.sum(0), weighted.shape[1:]).copy()
        divisor[np.abs(divisor) < 1e-8] = 1
    return lam * (mixed / divisor if normalize else mixed)


def linear_reference(xs, weights, normalize=True):
    total = sum(w * np.asarray(x, np.float64) for w, x in zip(weights, xs))
    return total / sum(weights) if normalize else total


def slerp_reference(t, v0, v1, dot_threshold=0.9995, eps=1e-8):
    """Spherical interpolation of the two tensors taken as vectors; linear when nearly parallel."""
    a, b = np.asarray(v0, np.float64).ravel(), np.asarray(v1, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = float(np.clip((a / na) @ (b / nb), -1, 1))
    if abs(dot) > dot_threshold:
        out = (1 - t) * a + t * b
    else:
        theta = np.arccos(dot)
        out = (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)
    return out.reshape(np.shape(v0))


def nuslerp_reference(t, v0, v1, row_wise=False, flatten=True, eps=1e-8):
    """SLERP of each row (or column, or the whole tensor as one vector)."""
    v0, v1 = np.asarray(v0, np.float64), np.asarray(v1, np.float64)
    shape = v0.shape
    if flatten:
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    elif row_wise:
        a, b = np.swapaxes(v0, 0, -1), np.swapaxes(v1, 0, -1)
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    else:
        a, b = v0.reshape(-1, shape[-1]), v1.reshape(-1, shape[-1])
    out = np.empty_like(a)
    for r in range(a.shape[0]):
        x, y = a[r], b[r]
        cos = float(np.clip((x / max(np.linalg.norm(x), 1e-7)) @ (y / max(np.linalg.norm(y), 1e-7)), -1, 1))
        if 1 - cos * cos <= eps ** 2:
            out[r] = (1 - t) * x + t * y
        else:
            theta = np.arccos(cos)
            out[r] = (np.sin((1 - t) * theta) * x + np.sin(t * theta) * y) / np.sin(theta)
    if flatten:
        return out.reshape(shape)
    if row_wise:
        return np.swapaxes(out.reshape(np.swapaxes(v0, 0, -1).shape), 0, -1)
    return out.reshape(shape)


def karcher_reference(xs, max_iter=10, tol=1e-5):
    """The Karcher mean of the directions (equal weights) by its fixed-point iteration, scaled by
    the mean norm."""
    shape = np.shape(xs[0])
    xs = [np.asarray(x, np.float64).ravel() for x in xs]
    norms = [np.linalg.norm(x) for x in xs]
    valid = [i for i, n in enumerate(norms) if n > tol]
    units = [xs[i] / norms[i] for i in valid]
    w = 1.0 / len(valid)
    mean = sum(w * u for u in units)
    mean = units[0].copy() if np.linalg.norm(mean) < tol else mean / np.linalg.norm(mean)
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for u in units:
            dot = float(np.clip(mean @ u, -1, 1))
            theta = np.arccos(dot)
            if theta >= tol:
                tangent += w * theta / np.sin(theta) * (u - dot * mean)
        step = np.linalg.norm(tangent)
        if step < tol:
            break
        mean = np.cos(step) * mean + np.sin(step) * tangent / step
        mean /= np.linalg.norm(mean)
    return (sum(norms) / len(xs) * mean).reshape(shape)


def model_stock_reference(base, ws, filter_wise=False):
    """Model Stock: base + t * mean(tau_i), t = K cos / (1 + (K-1) cos), cos the mean pairwise
    cosine of the task vectors (per tensor, or per row)."""
    base = np.asarray(base, np.float64)
    shape = base.shape
    rows = base.reshape(1, -1) if not filter_wise or base.ndim == 1 else base.reshape(-1, shape[-1])
    ws = [np.asarray(w, np.float64).reshape(rows.shape) for w in ws]
    taus = [w - rows for w in ws]
    cosines = []
    for i in range(len(taus)):
        for j in range(i + 1, len(taus)):
            num = (taus[i] * taus[j]).sum(-1)
            cosines.append(np.clip(num / np.maximum(np.linalg.norm(taus[i], axis=-1) * np.linalg.norm(taus[j], axis=-1),
                                                    1e-6), -1, 1))
    cos = np.mean(cosines, axis=0)[:, None]
    k = len(ws)
    denominator = 1 + (k - 1) * cos
    t = np.where(np.abs(denominator) < 1e-6, 0.0, k * cos / np.where(np.abs(denominator) < 1e-6, 1, denominator))
    return (t * (sum(ws) / k) + (1 - t) * rows).reshape(shape)


def sce_reference(taus, select_topk=1.0):
    """SCE: keep the entries of highest variance across the tasks, elect signs by summed mass,
    weight each task by its mean squared entry."""
    tvs = np.stack([np.asarray(t, np.float64) for t in taus])
    if select_topk < 1:
        var = tvs.var(axis=0)
        k = int(np.count_nonzero(var) * select_topk)
        tvs = tvs * _keep_top(var, k)[None]
    majority = np.where(tvs.sum(0) >= 0, 1.0, -1.0)
    erase = np.sign(tvs) == majority
    ms = (tvs ** 2).reshape(len(taus), -1).mean(1)
    w = np.full(len(taus), 1 / len(taus)) if abs(ms.sum()) < 1e-6 else ms / ms.sum()
    erased = w.reshape(-1, *[1] * (tvs.ndim - 1)) * erase
    return (tvs * erased).sum(0) / np.maximum(erased.sum(0), 1e-6)


# -- the whole-tensor torch implementations the streamed methods replaced (dist-svc before issue 23):
# float32 references of their values, bit for bit where the streamed order of operations allows

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



def sce_whole(deltas, p, where):
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

SLERP_CHUNK = 1 << 20  # elements per chunk of the norms and the dot product, as mergekit's


def slerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
                  eps: float = 1e-8) -> torch.Tensor:
    """mergekit's `slerp` of two tensors, each taken as one vector."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    tt = torch.tensor([[t]], dtype=dtype, device=v0.device)
    if not a.shape[1]:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    starts = range(0, a.shape[1], SLERP_CHUNK)
    norm_a = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(a[:, s:s + SLERP_CHUNK].to(dtype), dim=1, keepdim=True) for s in starts]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(b[:, s:s + SLERP_CHUNK].to(dtype), dim=1, keepdim=True) for s in starts]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([((a[:, s:s + SLERP_CHUNK].to(dtype) / norm_a) * (b[:, s:s + SLERP_CHUNK].to(dtype) / norm_b))
                       .sum(dim=1, keepdim=True) for s in starts]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    result = torch.empty_like(a)
    for s in starts:
        result[:, s:s + SLERP_CHUNK] = coef_a * a[:, s:s + SLERP_CHUNK].to(dtype) + coef_b * b[:, s:s + SLERP_CHUNK].to(dtype)
    return result.reshape(v0.shape)


def nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, eps: float = 1e-8,
                    flatten: bool = False) -> torch.Tensor:
    """mergekit's `nuslerp`: SLERP along `dim` (or of the flattened tensors)."""
    out_shape = v0.shape

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos_theta = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int = 10,
                 tol: float = 1e-5) -> torch.Tensor:
    """mergekit's weighted Karcher mean on the unit sphere, scaled by the weighted mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for tensor in tensors:
        norm = torch.linalg.vector_norm(tensor.to(dtype))
        norms.append(norm)
        units.append(torch.zeros_like(tensor) if norm.item() == 0.0 else (tensor / norm).to(tensor.dtype))
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(tensor * 0 for tensor in tensors)
    alpha_sum = sum(alphas[i] for i in valid)
    weights = [alphas[i] / alpha_sum for i in valid]
    valid_units = [units[i] for i in valid]
    mean = torch.zeros_like(valid_units[0])
    for alpha, unit in zip(weights, valid_units):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = valid_units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(weights, valid_units):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))
    return scale * mean


def model_stock_whole(weights, p, where):
    """mergekit's Model Stock (the base and at least two fine-tunes)."""
    w_0 = weights[where.base]
    ws = [w for i, w in enumerate(weights) if i != where.base]
    out_shape = w_0.shape
    if p["filter_wise"]:
        if w_0.dim() == 1:
            w_0, ws = w_0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w_0, ws = w_0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    cos_thetas = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norm_product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos_thetas.append(((a * b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6  # no finite estimate: keep the base there
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)
    average = sum(ws) / count
    return (t * average + (1 - t) * w_0).reshape(out_shape)


def ties_whole(deltas, p, where):
    pruned = [magnitude_prune(t, d, p["rescale"]) for t, d in zip(deltas, p["density"])]
    return combine(pruned, p["weight"], p["lambda"], p["normalize"], consensus=True)


def breadcrumbs_whole(deltas, p, where, consensus=False):
    kept = [magnitude_outliers(t, d, g, p["rescale"]) for t, d, g in zip(deltas, p["density"], p["gamma"])]
    return combine(kept, p["weight"], p["lambda"], p["normalize"], consensus)


def slerp_whole(weights, p, where):
    return slerp_vectors(p["t"], weights[where.base], weights[1 - where.base])


def nuslerp_whole(tensors, p, where):
    w0, w1 = p["weight"]
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    return nuslerp_vectors(t, tensors[0], tensors[1], dim=0 if p["nuslerp_row_wise"] else -1,
                           flatten=p["nuslerp_flatten"])


def karcher_whole(weights, p, where):
    if len(weights) == 1:
        return weights[0]
    return karcher_mean(weights, [1.0 / len(weights)] * len(weights), p["max_iter"], p["tol"])
