"""Singular Value Calibration (SVC) of one merged delta: pure math, no I/O.

Contract: ../shared/SVC.md (arXiv 2602.05536). For the thin SVD `Wm = U diag(S) V^T`, each
singular direction r is measured against each task i by how many copies of the task's
projection the merge holds,

    s_ri = <u_r^T Wm, u_r^T tau_i> / max(||u_r^T tau_i||^2, 1e-12),

and the singular values are divided by `eta_r = mean_i max(s_ri, alpha)`. Directions shared by
all K tasks (s ~ K * lambda) shrink back to one task's strength; task-specific ones grow by at
most 1/alpha.

This module is the exact reference path: a full float64 SVD. Task vectors are consumed one at a
time from any iterable, so a worker can stream them from storage.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

EPS_PROJ = 1e-12  # the authors' clamp on ||a_i||^2: a zero task vector gives s = 0, not NaN


@dataclass(frozen=True)
class Calibrated:
    delta: torch.Tensor  # the calibrated delta Wm', float64
    singular_values: torch.Tensor  # S of Wm, descending, float64
    eta: torch.Tensor  # the divisor per singular direction, float64

    def summary(self, top: int = 8) -> dict:
        """Small, JSON-able facts for the manifest and the CLI."""
        s = self.singular_values
        after = s / self.eta
        live = s > s[0] * 1e-12 if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
        eta_live = self.eta[live]
        return {
            "path": "svd",
            "rank": int(live.sum()),
            "sigma_before": [float(x) for x in s[:top]],
            "sigma_after": [float(x) for x in after[:top]],
            "eta_max": float(eta_live.max()) if eta_live.numel() else 1.0,
            "eta_min": float(eta_live.min()) if eta_live.numel() else 1.0,
            "eta_mean": float(eta_live.mean()) if eta_live.numel() else 1.0,
        }


def should_calibrate(name: str, shape: Sequence[int], skip: Sequence[str]) -> bool:
    """Only 2-D tensors whose name matches none of the skip patterns (fnmatch globs)."""
    return len(shape) == 2 and not any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)


def calibrate_singular_values(
    merged: torch.Tensor,
    task_deltas: Iterable[torch.Tensor],
    alpha: float,
    side: str = "column",
    target: int | None = None,
) -> Calibrated:
    """Rescale the singular values of `merged` (m x n) by the overlap with each task vector.

    `task_deltas` are the raw (unweighted) task vectors, iterated once. `side="row"` measures
    the projections `Wm v_r`, `tau_i v_r` instead; `target=t` calibrates against task t alone
    (eta_r = max(s_rt, alpha) where s_rt > 0, else 1).
    """
    if merged.ndim != 2:
        raise ValueError(f"calibration needs a 2-D tensor, got shape {tuple(merged.shape)}")
    if side not in ("column", "row"):
        raise ValueError(f"side must be 'column' or 'row', got {side!r}")
    wm = merged.to(torch.float64)
    u, s, vh = torch.linalg.svd(wm, full_matrices=False)

    if side == "column":
        a_merged = s[:, None] * vh  # u_r^T Wm = S_r v_r^T, one row per direction
    else:
        a_merged = (u * s).T  # (Wm v_r)^T = S_r u_r^T

    eta_sum = torch.zeros_like(s)
    k = 0
    for i, tau in enumerate(task_deltas):
        if tuple(tau.shape) != tuple(merged.shape):
            raise ValueError(f"task vector {i} has shape {tuple(tau.shape)}, merged delta {tuple(merged.shape)}")
        tau = tau.to(torch.float64)
        a_task = u.T @ tau if side == "column" else (tau @ vh.T).T
        overlap = (a_merged * a_task).sum(dim=1) / (a_task * a_task).sum(dim=1).clamp_min(EPS_PROJ)
        if target is None:
            eta_sum += overlap.clamp_min(alpha)
        elif i == target:
            eta_sum = torch.where(overlap > 0, overlap.clamp_min(alpha), torch.ones_like(overlap))
        k += 1
    if k == 0:
        raise ValueError("calibration needs at least one task vector")
    if target is not None and target >= k:
        raise ValueError(f"target {target} is out of range for {k} task vectors")
    eta = eta_sum / k if target is None else eta_sum
    delta = (u * (s / eta)) @ vh
    return Calibrated(delta=delta, singular_values=s, eta=eta)
