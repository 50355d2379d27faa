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
                    method=None) -> dict[str, np.ndarray]:
    """base + base method (TA unless `method(name, taus)` is given) + SVC on 2-D, non-skipped
    tensors, all in float64."""
    base = load_checkpoint(base_dir)
    fts = [load_checkpoint(d) for d in ft_dirs]
    k = len(fts)
    alpha = 1.0 / k if alpha is None else alpha
    out = {}
    for name, b in base.items():
        taus = [ft[name] - b for ft in fts]
        if method is not None:
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
