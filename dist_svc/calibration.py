"""Singular Value Calibration (SVC) of one merged delta: pure math, no I/O.

Contract: docs/calibration.md (arXiv 2602.05536). For the thin SVD `Wm = U diag(S) V^T`, each
singular direction r is measured against each task i by how many copies of the task's
projection the merge holds,

    s_ri = <u_r^T Wm, u_r^T tau_i> / max(||u_r^T tau_i||^2, 1e-12),

and the singular values are divided by `eta_r = mean_i max(s_ri, alpha)`. Directions shared by
all K tasks (s ~ K * lambda) shrink back to one task's strength; task-specific ones grow by at
most 1/alpha.

Two implementations of the same definition:
- `calibrate_singular_values`: a full SVD (float64 by default; float32 is the paper's own approach,
  kept for the benchmark). The reference path, and the fallback.
- `GramCalibration`: the streamable formulation. Everything the calibration needs is a set of
  float64 Gram matrices on the smaller side, which are sums over row blocks; an `eigh` of the
  n x n Gram replaces the SVD; the result is `(Wm V) diag(1/eta) V^T`, applied block by block
  again. Memory O(n^2 (K+1)) instead of O(m n K), and several times faster. One Gram pass and
  one eigh serve every final scale of `Wm` (a merge's lambda), alpha and target.
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
    path: str = "svd"  # which implementation computed it: "svd", "gram" or "svd-fallback"
    overlaps: torch.Tensor | None = None  # K x r: s_ri, the copies of task i's projection in direction r

    def summary(self) -> dict:
        return calibration_summary(self.singular_values, self.eta, self.path, self.overlaps)


SUMMARY_TOP = 16


def calibration_summary(singular_values: torch.Tensor, eta: torch.Tensor, path: str,
                        overlaps: torch.Tensor | None = None, top: int = SUMMARY_TOP) -> dict:
    """Small, JSON-able facts for the manifest and `dist-svc inspect`: the top singular values of
    the base method's delta before and after calibration, the overlap coefficients s_ri of the top
    directions (one list per direction, one value per task), eta's range and quantiles over live
    directions, and what calibration did to the whole spectrum: the norm ratio
    ||Wm'||_F / ||Wm||_F and, before and after, the share of the delta's energy (squared
    Frobenius norm) in the directions it shrank (eta > 1: held more than once, the shared part)
    and in those it grew (eta < 1: task-specific). Values keep 7 significant digits: plenty for
    a report, half the bytes of a float's repr."""
    s = singular_values.double().cpu()
    eta = eta.double().cpu()
    after = s / eta
    live = _live(s)
    eta_live = eta[live]
    before_energy, after_energy = float(s.square().sum()), float(after.square().sum())

    def shares(mask: torch.Tensor) -> list[float]:
        if not before_energy:
            return [0.0, 0.0]
        return [round(float(s[mask].square().sum()) / before_energy, 6),
                round(float(after[mask].square().sum()) / after_energy, 6) if after_energy else 0.0]

    quantiles = torch.quantile(eta_live, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)) \
        if eta_live.numel() else torch.ones(5, dtype=torch.float64)
    return {
        "path": path,
        "rank": int(live.sum()),
        "sigma_before": _rounded(s[:top]),
        "sigma_after": _rounded(after[:top]),
        "eta_max": float(eta_live.max()) if eta_live.numel() else 1.0,
        "eta_min": float(eta_live.min()) if eta_live.numel() else 1.0,
        "eta_mean": float(eta_live.mean()) if eta_live.numel() else 1.0,
        "eta_quantiles": _rounded(quantiles),  # 0, 10, 50, 90, 100 %
        "norm_ratio": (after_energy / before_energy) ** 0.5 if before_energy else 1.0,
        "shrunk": shares(live & (eta > 1 + 1e-9)),  # [share before, share after]
        "grown": shares(live & (eta < 1 - 1e-9)),
        "overlaps": [] if overlaps is None else [_rounded(col) for col in overlaps.double().cpu()[:, :top].T],
    }


def _rounded(values: torch.Tensor) -> list[float]:
    return [float(f"{x:.7g}") for x in values.tolist()]


def should_calibrate(name: str, shape: Sequence[int], skip: Sequence[str]) -> bool:
    """Only 2-D tensors with elements, whose name matches none of the skip patterns (fnmatch globs)."""
    return len(shape) == 2 and min(shape) > 0 and not any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)


def calibrate_singular_values(
    merged: torch.Tensor,
    task_deltas: Iterable[torch.Tensor],
    alpha: float,
    side: str = "column",
    target: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> Calibrated:
    """Rescale the singular values of `merged` (m x n) by the overlap with each task vector.

    `task_deltas` are the raw (unweighted) task vectors, iterated once. `side="row"` measures
    the projections `Wm v_r`, `tau_i v_r` instead; `target=t` calibrates against task t alone
    (eta_r = max(s_rt, alpha) where s_rt > 0, else 1). `dtype=torch.float32` is the paper's
    approach (float32 SVD), for comparison only.
    """
    if merged.ndim != 2:
        raise ValueError(f"calibration needs a 2-D tensor, got shape {tuple(merged.shape)}")
    if side not in ("column", "row"):
        raise ValueError(f"side must be 'column' or 'row', got {side!r}")
    wm = merged.to(dtype)
    u, s, vh = torch.linalg.svd(wm, full_matrices=False)

    if side == "column":
        a_merged = s[:, None] * vh  # u_r^T Wm = S_r v_r^T, one row per direction
    else:
        a_merged = (u * s).T  # (Wm v_r)^T = S_r u_r^T

    eta_sum = torch.zeros_like(s)
    k = 0
    overlaps = []
    for i, tau in enumerate(task_deltas):
        if tuple(tau.shape) != tuple(merged.shape):
            raise ValueError(f"task vector {i} has shape {tuple(tau.shape)}, merged delta {tuple(merged.shape)}")
        tau = tau.to(dtype)
        a_task = u.T @ tau if side == "column" else (tau @ vh.T).T
        overlap = (a_merged * a_task).sum(dim=1) / (a_task * a_task).sum(dim=1).clamp_min(EPS_PROJ)
        overlaps.append(overlap)
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
    eta = torch.where(_live(s), eta, torch.ones_like(eta))  # the null space is left as it is
    delta = (u * (s / eta)) @ vh
    return Calibrated(delta=delta, singular_values=s, eta=eta, path="svd", overlaps=torch.stack(overlaps))


# The null space, by definition (both implementations): singular directions with
# S_r <= NULL_REL * S_max get eta = 1. Their part of Wm is at most 1e-6 of its norm, below what
# a float32 SVD (the paper's approach) resolves at all, and a float64 Gram cannot measure their
# overlaps (its eigenvalues there are rounding noise).
# Above it, the Gram's eigenvalues have absolute error ~eps * S_max^2, so S_r^2 and every s_ri
# have relative error ~eps / rho_r^2 (rho_r = S_r / S_max). Only overlaps above alpha move eta
# (max(s, alpha) clamps the others), so direction r's part of Wm' moves by about
#     S_r / eta_r * (mean over unclamped i of s_ri) / eta_r * eps / rho_r^2.
# When these add up (Frobenius) to more than GRAM_TOLERANCE of ||Wm'||_F, the matrix is
# recomputed by full SVD.
NULL_REL = 1e-6
GRAM_TOLERANCE = 1e-10
EPS64 = float(torch.finfo(torch.float64).eps)


def _live(s: torch.Tensor) -> torch.Tensor:
    """Directions outside the null space, for descending singular values `s`."""
    if not s.numel() or not s[0] > 0:
        return torch.zeros_like(s, dtype=torch.bool)
    return s > NULL_REL * s[0]


class GramCalibration:
    """SVC of an m x n merged delta from float64 Grams, fed in row blocks (m >= n is cheapest;
    for a wide matrix feed the rows of its transpose with the opposite `side`, see `oriented`).

        G   = sum_b Wm_b^T Wm_b            C_i = sum_b Wm_b^T tau_ib
        T_i = sum_b tau_ib^T tau_ib         (row side only)

    `solve()` takes the eigendecomposition G = V diag(S^2) V^T and the overlaps
      column side: <a_m, a_i> = <v_r, x_ri>,  ||a_i||^2 = ||x_ri||^2 / S_r^2,  x_ri = C_i^T v_r
      row side:    <a_m, a_i> = v_r^T C_i v_r, ||a_i||^2 = v_r^T T_i v_r = sum over rows of (tau_i V)_r^2
    and the solution Wm' = Wm V diag(1/eta) V^T, applied block by block.

    On the row side the task Grams T_i (K more n x n matrices) are kept only while they take at
    most TASK_GRAMS_BYTES (`keep_task_grams`); beyond, `needs_projections` is true and the
    caller feeds the task blocks once more after pass 1 (`add_projections`), which sums the
    same ||tau_i v_r||^2 from `tau_i V` directly, in (K + 1) n^2 memory instead of (2K + 1) n^2.
    """

    def __init__(self, n: int, k: int, alpha: float, side: str = "column", target: int | None = None,
                 device: torch.device | str = "cpu", task_grams: bool | None = None):
        if side not in ("column", "row"):
            raise ValueError(f"side must be 'column' or 'row', got {side!r}")
        self.n, self.k, self.alpha, self.side, self.target = n, k, alpha, side, target
        opts = {"dtype": torch.float64, "device": device}
        self.gram = torch.zeros(n, n, **opts)
        self.cross = [torch.zeros(n, n, **opts) for _ in range(k)]
        keep = side == "row" and (keep_task_grams(n, k) if task_grams is None else task_grams)
        self.task_grams = [torch.zeros(n, n, **opts) for _ in range(k)] if keep else None
        self.rows = 0
        self._eigen: tuple[torch.Tensor, torch.Tensor] | None = None  # (descending eigenvalues, V)
        self._projections: list[torch.Tensor] | None = None  # per task, sum of (tau_i V)^2 over rows
        self._solved: tuple | None = None  # `_spectrum()`
        self._finite_spectrum = True

    @property
    def needs_projections(self) -> bool:
        """Whether the task blocks must be fed again (`add_projections`) before `solve`."""
        return self.side == "row" and self.task_grams is None

    def add(self, merged_rows: torch.Tensor, task_rows: Iterable[torch.Tensor]) -> None:
        wm = merged_rows.to(torch.float64)
        self.gram.addmm_(wm.T, wm)
        count = 0
        for i, tau in enumerate(task_rows):
            tau = tau.to(torch.float64)
            self.cross[i].addmm_(wm.T, tau)
            if self.task_grams is not None:
                self.task_grams[i].addmm_(tau.T, tau)
            count += 1
        if count != self.k:
            raise ValueError(f"expected {self.k} task blocks, got {count}")
        self.rows += wm.shape[0]

    def decompose(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eigendecomposition of G (ascending, as eigh returns it), once; G itself is then
        freed. Peak memory here: G, its eigenvectors and eigh's workspace (about 2 n^2)."""
        if self._eigen is None:
            self._eigen = torch.linalg.eigh(self.gram)
            self.gram = None
        return self._eigen

    def add_projections(self, task_rows: Iterable[torch.Tensor]) -> None:
        """One block of every task vector, after pass 1: accumulates ||tau_i v_r||^2."""
        _, v = self.decompose()
        if self._projections is None:
            self._projections = [torch.zeros(self.n, dtype=torch.float64, device=v.device) for _ in range(self.k)]
        for i, tau in enumerate(task_rows):
            self._projections[i] += (tau.to(torch.float64) @ v).square().sum(dim=0)

    def solve(self, scale: float = 1.0, alpha: float | None = None, target: int | None = -1) -> "GramSolution":
        """eta per direction and the solution for the merged delta `scale * Wm` (the Grams were
        fed `Wm`); `alpha`, `target`: this solution's (default: the constructor's). `trusted` is
        False when the spectrum needs the full-SVD path for float64-level accuracy (see
        GRAM_TOLERANCE).

        The eigendecomposition and the overlaps are computed once and serve every call: the SVD
        of `scale * Wm` has the same V and singular values |scale| S, and its overlaps are
        `scale * s_ri` (numerator and projection both scale with it; its square cancels), so
        merges that differ only in a final scale of their delta, in alpha or in target share
        one Gram pass and one eigh (batch merging, dist_svc.batch)."""
        alpha = self.alpha if alpha is None else alpha
        target = self.target if target == -1 else target
        s, v, live, rel_err, overlaps = self._spectrum()
        s = s * abs(scale)  # ascending
        eta_sum = torch.zeros_like(s)
        moving = torch.zeros_like(s)  # sum over unclamped i of s_ri: how much eta follows the s_ri
        scaled = []
        for i, base_overlap in enumerate(overlaps):
            overlap = base_overlap * scale
            scaled.append(torch.where(live, overlap, torch.zeros_like(overlap)))
            unclamped = overlap.abs() * (1 + rel_err) > alpha
            if target is None:
                eta_sum += overlap.clamp_min(alpha)
            elif i == target:
                eta_sum = torch.where(overlap > 0, overlap.clamp_min(alpha), torch.ones_like(overlap))
            if target is None or i == target:
                moving += torch.where(unclamped, overlap.abs(), torch.zeros_like(overlap))
        count = self.k if target is None else 1
        eta = torch.where(live, eta_sum / count, torch.ones_like(eta_sum))  # null space: eta = 1
        trusted = self._finite_spectrum and self._error_bound(s, eta, moving / count, rel_err, live) <= GRAM_TOLERANCE
        return GramSolution(v=v, factors=scale / eta, singular_values=s.flip(0), eta=eta.flip(0), trusted=trusted,
                            overlaps=torch.stack(scaled).flip(1) if scaled else None)

    def _spectrum(self):
        """(S ascending, V, live directions, S's relative error, s_ri per task) of the Grams as
        fed, computed once; the Grams are freed."""
        if self._solved is None:
            if self.needs_projections and self._projections is None and self.k:
                raise ValueError("the row side without task Grams needs add_projections() before solve()")
            evals, v = self.decompose()
            self._finite_spectrum = bool(torch.isfinite(evals).all())
            s = evals.clamp_min(0).sqrt()  # ascending
            s_max = s[-1] if s.numel() else torch.zeros((), dtype=s.dtype)
            live = s > NULL_REL * s_max if s_max > 0 else torch.zeros_like(s, dtype=torch.bool)
            rel_err = EPS64 / torch.where(live, s / s_max, torch.ones_like(s)).square() if s_max > 0 else s
            overlaps = []
            for i in range(self.k):
                num, den = self._overlap_terms(i, v, s, live)
                overlaps.append(num / den.clamp_min(EPS_PROJ))
            self._solved = (s, v, live, rel_err, overlaps)
            self._eigen = None
            self.cross = self.task_grams = self._projections = None
        return self._solved

    def _overlap_terms(self, i: int, v: torch.Tensor, s: torch.Tensor, live: torch.Tensor):
        """<a_m, a_i> and ||a_i||^2 of task i for every direction, a chunk of V's columns at a
        time."""
        num, den = torch.empty_like(s), torch.empty_like(s)
        chunk = max(1, OVERLAP_CHUNK // max(self.n, 1))
        for j0 in range(0, self.n, chunk):
            vj = v[:, j0:j0 + chunk]
            if self.side == "column":
                x = self.cross[i].T @ vj  # column r: x_ri = tau_i^T Wm v_r
                num[j0:j0 + chunk] = (vj * x).sum(dim=0)
                sj = s[j0:j0 + chunk]
                den[j0:j0 + chunk] = (x * x).sum(dim=0) / torch.where(live[j0:j0 + chunk], sj * sj, torch.ones_like(sj))
            else:
                num[j0:j0 + chunk] = (vj * (self.cross[i] @ vj)).sum(dim=0)
                if self.task_grams is not None:
                    den[j0:j0 + chunk] = (vj * (self.task_grams[i] @ vj)).sum(dim=0)
        if self.side == "row" and self.task_grams is None:
            den = self._projections[i]
        return num, den

    @staticmethod
    def _error_bound(s, eta, moving, rel_err, live) -> float:
        """Estimated relative Frobenius error of the Gram path's Wm' (see GRAM_TOLERANCE)."""
        if not bool(live.any()):
            return 0.0
        s, eta, moving, rel_err = s[live], eta[live], moving[live], rel_err[live]
        moving = torch.where(rel_err >= 1, torch.maximum(moving, eta), moving)  # not even a sign is known
        per_direction = s / eta * (moving / eta * rel_err).clamp_max(1.0)
        return float(torch.linalg.norm(per_direction) / torch.linalg.norm(s / eta))


TASK_GRAMS_BYTES = 2 << 30  # the row side's K task Grams are kept up to this size
OVERLAP_CHUNK = 1 << 24  # elements of a temporary while the overlaps are computed


def keep_task_grams(n: int, k: int) -> bool:
    """Whether the row side keeps its task Grams (K n x n float64) rather than a second pass over
    the task vectors. A function of the shape only, so every executor computes the same bytes."""
    return k * n * n * 8 <= TASK_GRAMS_BYTES


@dataclass(frozen=True)
class GramSolution:
    """Wm' = scale * Wm V diag(1 / eta) V^T: `apply` computes it for a block of Wm's rows as
    `(Wm_b V) diag(scale / eta) V^T`, two products of the block with V. Solutions of one
    `GramCalibration` share V, so one rotation `Wm_b V` serves all of them (`rotate`, then
    `finish` per solution)."""
    v: torch.Tensor  # n x n, float64, ascending order; shared by the solutions of one calibration
    factors: torch.Tensor  # scale / eta per direction, ascending
    singular_values: torch.Tensor
    eta: torch.Tensor
    trusted: bool
    overlaps: torch.Tensor | None = None  # K x n

    @staticmethod
    def rotate(v: torch.Tensor, merged_rows: torch.Tensor) -> torch.Tensor:
        return merged_rows.to(torch.float64) @ v

    def finish(self, rotated: torch.Tensor) -> torch.Tensor:
        return (rotated * self.factors) @ self.v.T

    def apply(self, merged_rows: torch.Tensor) -> torch.Tensor:
        return self.finish(self.rotate(self.v, merged_rows))


def oriented(shape: Sequence[int], side: str) -> tuple[bool, str]:
    """(transpose?, side) for the Gram path: work on the tall orientation, so the Grams are on
    the smaller side. For a wide matrix the transpose is calibrated with the other side: the
    column side of Wm is the row side of Wm^T (the same u_r^T Wm projections)."""
    m, n = shape
    if m >= n:
        return False, side
    return True, "row" if side == "column" else "column"


def calibrate_gram(
    merged: torch.Tensor,
    task_deltas: Sequence[torch.Tensor],
    alpha: float,
    side: str = "column",
    target: int | None = None,
    block_rows: int | None = None,
    task_grams: bool | None = None,
) -> Calibrated:
    """The Gram path on whole in-memory matrices (fed in blocks of `block_rows`), with the full
    SVD as fallback where the Gram cannot be trusted. The worker streams the same steps from
    storage instead."""
    if merged.ndim != 2:
        raise ValueError(f"calibration needs a 2-D tensor, got shape {tuple(merged.shape)}")
    transpose, gram_side = oriented(merged.shape, side)
    wm = merged.T if transpose else merged
    taus = [t.T if transpose else t for t in task_deltas]
    cal = GramCalibration(wm.shape[1], len(taus), alpha, gram_side, target, device=merged.device,
                          task_grams=task_grams)
    step = block_rows or wm.shape[0] or 1
    for r0 in range(0, wm.shape[0], step):
        cal.add(wm[r0:r0 + step], [t[r0:r0 + step] for t in taus])
    if cal.needs_projections:
        for r0 in range(0, wm.shape[0], step):
            cal.add_projections([t[r0:r0 + step] for t in taus])
    solution = cal.solve()
    if not solution.trusted:
        fallback = calibrate_singular_values(merged, task_deltas, alpha, side, target)
        return Calibrated(fallback.delta, fallback.singular_values, fallback.eta, "svd-fallback", fallback.overlaps)
    delta = solution.apply(wm)
    return Calibrated(delta.T if transpose else delta, solution.singular_values, solution.eta, "gram",
                      solution.overlaps)
