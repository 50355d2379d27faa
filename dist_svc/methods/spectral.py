"""SVD-based merges of 2-D task vectors (other tensors: the mean, or the sum for the Iso family).

    tsv      TSV-M: each task's top r/K singular triplets, the U's and V's concatenated and
             orthogonalised (polar factor), reassembled with the kept singular values
    iso_c    Iso-C: the sum of the task vectors with all its singular values set to their mean
    iso_cts  Iso-CTS: the sum's top `common_fraction` directions plus each task's top directions
             of its residual outside them, orthogonalised, with Iso-C's flat spectrum
    star     STAR: each task truncated to the smallest rank holding `eta` of its nuclear norm,
             rescaled to restore the nuclear norm, then averaged

Task vectors are weighted (`w_i tau_i`) first; the result is multiplied by `lambda`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dist_svc.methods.base import LAMBDA, WEIGHT, Param, register


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal factor P Q^T of x = P S Q^T: the closest matrix with orthonormal columns
    (or rows, when x is wide)."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def tsv(deltas: Sequence[torch.Tensor], lam: float = 1.0) -> torch.Tensor:
    if deltas[0].ndim != 2:
        return torch.stack(list(deltas)).mean(dim=0) * lam
    k = len(deltas)
    keep = max(1, min(deltas[0].shape) // k)
    us, ss, vs = [], [], []
    for tau in deltas:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vs.append(vh[:keep].T)
    u, s, v = polar(torch.cat(us, dim=1)), torch.cat(ss), polar(torch.cat(vs, dim=1))
    return (u * s) @ v.T * lam


def iso_c(deltas: Sequence[torch.Tensor], lam: float = 1.0) -> torch.Tensor:
    total = torch.stack(list(deltas)).sum(dim=0)
    if total.ndim != 2:
        return total * lam
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return s.mean() * (u @ vh) * lam


def iso_cts(deltas: Sequence[torch.Tensor], lam: float = 1.0, common_fraction: float = 0.8) -> torch.Tensor:
    total = torch.stack(list(deltas)).sum(dim=0)
    if total.ndim != 2:
        return total * lam
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    rank = s.numel()
    common = int(common_fraction * rank)
    per_task = (rank - common) // len(deltas)
    u_common = u[:, :common]
    us, vs = [u_common], [vh[:common].T]
    for tau in deltas:
        residual = tau - u_common @ (u_common.T @ tau)
        ur, _, vhr = torch.linalg.svd(residual, full_matrices=False)
        us.append(ur[:, :per_task])
        vs.append(vhr[:per_task].T)
    return s.mean() * (polar(torch.cat(us, dim=1)) @ polar(torch.cat(vs, dim=1)).T) * lam


def star(deltas: Sequence[torch.Tensor], lam: float = 1.0, eta: float = 0.4) -> torch.Tensor:
    out = []
    for tau in deltas:
        if tau.ndim != 2:
            out.append(tau)
            continue
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        nuclear = s.sum()
        if nuclear == 0:
            out.append(torch.zeros_like(tau))
            continue
        rank = int(torch.searchsorted(torch.cumsum(s, 0), eta * nuclear).item()) + 1
        rank = min(rank, s.numel())
        kept = s[:rank] * (nuclear / s[:rank].sum())
        out.append((u[:, :rank] * kept) @ vh[:rank])
    return torch.stack(out).mean(dim=0) * lam


# -- registrations: task vectors are weighted (w_i tau_i) before the method -----------------------

def _weighted(deltas, p):
    return [d * w if w != 1.0 else d for d, w in zip(deltas, p["weight"])]


@register("tsv", LAMBDA, WEIGHT, needs="tensor", alpha_is_one=True, reference="https://arxiv.org/abs/2412.00081")
def tsv_merge(deltas, p, where):
    return tsv(_weighted(deltas, p), lam=p["lambda"])


@register("iso_c", LAMBDA, WEIGHT, needs="tensor", reference="https://arxiv.org/abs/2502.04959")
def iso_c_merge(deltas, p, where):
    return iso_c(_weighted(deltas, p), lam=p["lambda"])


@register("iso_cts", LAMBDA, WEIGHT, Param("common_fraction", 0.8, float, 0.0, 1.0, low_inclusive=True,
                                           doc="share of the rank given to the common subspace"),
          needs="tensor", reference="https://arxiv.org/abs/2502.04959")
def iso_cts_merge(deltas, p, where):
    return iso_cts(_weighted(deltas, p), lam=p["lambda"], common_fraction=p["common_fraction"])


@register("star", LAMBDA, WEIGHT, Param("eta", 0.4, float, 0.0, 1.0, doc="share of each task's nuclear norm kept"),
          needs="tensor", reference="https://arxiv.org/abs/2502.10339")
def star_merge(deltas, p, where):
    return star(_weighted(deltas, p), lam=p["lambda"], eta=p["eta"])
