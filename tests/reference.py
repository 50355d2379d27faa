"""Float64 references, written from the definitions (docs/calibration.md, mergekit), independent of
the product's code paths: numpy instead of torch, a loop over ranks instead of batched products."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file


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
