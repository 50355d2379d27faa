"""Float64 references, written from the definitions (../shared/SVC.md, mergekit), independent of
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
                    skip: tuple[str, ...] = ("*embed*", "*wte*", "*wpe*", "*lm_head*")) -> dict[str, np.ndarray]:
    """base + TA (+ SVC on 2-D, non-skipped tensors), all in float64."""
    base = load_checkpoint(base_dir)
    fts = [load_checkpoint(d) for d in ft_dirs]
    k = len(fts)
    alpha = 1.0 / k if alpha is None else alpha
    out = {}
    for name, b in base.items():
        taus = [ft[name] - b for ft in fts]
        wm = sum(w * t for w, t in zip(weights, taus))
        if normalize:
            wm = wm / sum(weights)
        wm = lam * wm
        if calibrate and b.ndim == 2 and not any(fnmatch.fnmatchcase(name, p) for p in skip):
            wm = svc_reference(wm, taus, alpha)
        out[name] = b + wm
    return out


def load_output(out_dir: Path) -> dict[str, torch.Tensor]:
    """The merged checkpoint through its index, exactly as stored."""
    index = json.loads((Path(out_dir) / "model.safetensors.index.json").read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(Path(out_dir) / fname)))
    assert set(out) == set(index["weight_map"])
    return out
