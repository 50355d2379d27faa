"""Calibration against the float64 reference of tests/reference.py, edge cases, and the effect."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_svc.calibration import calibrate_gram, calibrate_singular_values, should_calibrate
from tests.reference import svc_reference


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 24), n=st.integers(1, 24), k=st.integers(1, 6),
    alpha=st.sampled_from([None, 0.1, 0.5, 1.0, 2.0]), side=st.sampled_from(["column", "row"]),
    seed=st.integers(0, 2**31 - 1), lam=st.sampled_from([1.0, 0.3]),
)
def test_float64_path_matches_the_reference_to_1e_10(m, n, k, alpha, side, seed, lam):
    rng = np.random.default_rng(seed)
    taus = [rng.standard_normal((m, n)) for _ in range(k)]
    wm = lam * sum(taus)
    alpha = 1.0 / k if alpha is None else alpha
    got = calibrate_singular_values(torch.from_numpy(wm), [torch.from_numpy(t) for t in taus], alpha, side)
    assert _rel(got.delta, svc_reference(wm, taus, alpha, side)) <= 1e-10


@pytest.mark.parametrize("target", [0, 2])
def test_target_calibrates_against_one_task(target):
    rng = np.random.default_rng(1)
    taus = [rng.standard_normal((12, 9)) for _ in range(3)]
    wm = 0.3 * sum(taus)
    got = calibrate_singular_values(torch.from_numpy(wm), [torch.from_numpy(t) for t in taus], 0.2, target=target)
    assert _rel(got.delta, svc_reference(wm, taus, 0.2, target=target)) <= 1e-10


def test_float32_inputs_agree_with_the_reference_at_float32_level():
    rng = np.random.default_rng(2)
    taus = [rng.standard_normal((40, 24)).astype(np.float32) for _ in range(3)]
    wm = sum(taus)
    got = calibrate_singular_values(torch.from_numpy(wm), [torch.from_numpy(t) for t in taus], 1 / 3)
    # Inputs are exact float32 numbers and the computation is float64: float64-level agreement.
    assert _rel(got.delta, svc_reference(wm.astype(np.float64), [t.astype(np.float64) for t in taus], 1 / 3)) <= 1e-10


def test_k1_with_lambda_1_leaves_the_delta_unchanged():
    tau = np.random.default_rng(3).standard_normal((10, 7))
    got = calibrate_singular_values(torch.from_numpy(tau), [torch.from_numpy(tau)], 1.0)
    assert _rel(got.delta, tau) <= 1e-12
    assert torch.allclose(got.eta, torch.ones_like(got.eta))


def test_a_zero_task_vector_stays_finite_and_alpha_takes_over():
    rng = np.random.default_rng(4)
    taus = [rng.standard_normal((9, 6)), np.zeros((9, 6))]
    wm = sum(taus)
    got = calibrate_singular_values(torch.from_numpy(wm), [torch.from_numpy(t) for t in taus], 0.5)
    assert torch.isfinite(got.delta).all()
    assert _rel(got.delta, svc_reference(wm, taus, 0.5)) <= 1e-10


def test_a_zero_merge_stays_zero():
    zeros = torch.zeros(5, 8, dtype=torch.float64)
    got = calibrate_singular_values(zeros, [zeros, zeros], 0.5)
    assert torch.equal(got.delta, zeros)


@pytest.mark.parametrize("shape", [(30, 8), (8, 30)])
def test_rank_deficient_lora_style_deltas_match_the_reference(shape):
    rng = np.random.default_rng(5)
    m, n = shape
    taus = [rng.standard_normal((m, 2)) @ rng.standard_normal((2, n)) for _ in range(3)]
    wm = sum(taus)
    got = calibrate_singular_values(torch.from_numpy(wm), [torch.from_numpy(t) for t in taus], 1 / 3)
    assert torch.isfinite(got.delta).all()
    assert _rel(got.delta, svc_reference(wm, taus, 1 / 3)) <= 1e-10
    assert np.linalg.matrix_rank(got.delta.numpy(), tol=1e-8 * np.abs(wm).max()) <= 6


def _shared_plus_own(k: int, m: int = 64, n: int = 48):
    """K task vectors: one shared rank-1 part (strength 3) plus one own direction each, with
    distinct strengths so that every singular direction of the sum is unique."""
    rng = np.random.default_rng(6)
    q_u = np.linalg.qr(rng.standard_normal((m, k + 1)))[0]
    q_v = np.linalg.qr(rng.standard_normal((n, k + 1)))[0]
    own = [2.0 - 0.25 * i for i in range(k)]
    taus = [3.0 * np.outer(q_u[:, 0], q_v[:, 0]) + own[i] * np.outer(q_u[:, i + 1], q_v[:, i + 1]) for i in range(k)]
    return taus, own


@pytest.mark.parametrize("k", [2, 4, 6])
def test_shared_direction_inflated_k_fold_by_task_arithmetic_is_brought_back_to_one_task(k):
    """The paper's effect. With lambda = 1, TA holds the shared direction K times; calibration
    (alpha = 1/K) divides it by s = K, back to one task's strength. A task's own direction has
    s = 1 for its task and 0 (so alpha) for the others: eta = (1 + (K-1)/K)/K, so it grows by
    K^2/(2K-1), within the 1/alpha = K bound."""
    taus, own = _shared_plus_own(k)
    wm = sum(taus)
    assert np.linalg.svd(wm, compute_uv=False)[0] == pytest.approx(k * 3.0)  # K copies
    got = calibrate_singular_values(torch.from_numpy(wm), [torch.from_numpy(t) for t in taus], 1 / k)
    s_after = np.linalg.svd(got.delta.numpy(), compute_uv=False)[: k + 1]
    growth = k * k / (2 * k - 1)
    expected = sorted([3.0] + [o * growth for o in own], reverse=True)
    assert s_after == pytest.approx(expected, rel=1e-9)


def test_with_averaging_every_direction_ends_at_one_tasks_strength():
    """With lambda = 1/K (a plain average) the shared part is not inflated (s = 1, eta = 1) and
    each task's own direction, diluted K-fold by the average, is restored (eta = 1/K)."""
    k = 4
    taus, own = _shared_plus_own(k)
    wm = sum(taus) / k
    got = calibrate_singular_values(torch.from_numpy(wm), [torch.from_numpy(t) for t in taus], 1 / k)
    s_after = np.linalg.svd(got.delta.numpy(), compute_uv=False)[: k + 1]
    assert s_after == pytest.approx(sorted([3.0] + own, reverse=True), rel=1e-9)


def test_only_2d_tensors_not_matching_skip_patterns_are_calibrated():
    skip = ("*embed*", "*lm_head*")
    assert should_calibrate("model.layers.0.mlp.up_proj.weight", (8, 4), skip)
    assert not should_calibrate("model.embed_tokens.weight", (8, 4), skip)
    assert not should_calibrate("lm_head.weight", (8, 4), skip)
    assert not should_calibrate("model.norm.weight", (8,), skip)
    assert not should_calibrate("conv.weight", (8, 4, 3, 3), skip)


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 24), n=st.integers(1, 24), k=st.integers(1, 6),
    alpha=st.sampled_from([None, 0.1, 0.5, 1.0]), side=st.sampled_from(["column", "row"]),
    seed=st.integers(0, 2**31 - 1), rank=st.sampled_from([None, 1, 2]), block=st.integers(1, 8),
    task_grams=st.booleans(),
)
def test_gram_path_matches_the_reference_to_1e_10(m, n, k, alpha, side, seed, rank, block, task_grams):
    """Streamed in row blocks, tall or wide, full rank or LoRA-like rank-deficient; the row side
    with its task Grams or with the second pass that replaces them."""
    rng = np.random.default_rng(seed)
    if rank is None:
        taus = [rng.standard_normal((m, n)) for _ in range(k)]
    else:
        taus = [rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n)) for _ in range(k)]
    wm = 0.3 * sum(taus)
    alpha = 1.0 / k if alpha is None else alpha
    got = calibrate_gram(torch.from_numpy(wm), [torch.from_numpy(t) for t in taus], alpha, side, block_rows=block,
                         task_grams=task_grams)
    assert _rel(got.delta, svc_reference(wm, taus, alpha, side)) <= 1e-10
    assert got.path in ("gram", "svd-fallback")


def test_gram_path_handles_a_zero_merge_and_zero_task_vectors():
    zeros = torch.zeros(6, 4, dtype=torch.float64)
    assert torch.equal(calibrate_gram(zeros, [zeros, zeros], 0.5).delta, zeros)
    rng = np.random.default_rng(8)
    taus = [rng.standard_normal((7, 5)), np.zeros((7, 5))]
    got = calibrate_gram(torch.from_numpy(sum(taus)), [torch.from_numpy(t) for t in taus], 0.5)
    assert _rel(got.delta, svc_reference(sum(taus), taus, 0.5)) <= 1e-10


def test_a_spectrum_the_gram_cannot_resolve_falls_back_to_the_svd_and_says_so():
    """A direction held by one task only, 2e-6 of the largest singular value: its Gram eigenvalue
    (4e-12 relative) carries too few digits for float64-level eta (the Gram path alone is 1.2e-10
    off here), so the full SVD computes it. At 1e-4 of the largest the Gram path is trusted."""
    rng = np.random.default_rng(9)
    q_u = np.linalg.qr(rng.standard_normal((20, 2)))[0]
    q_v = np.linalg.qr(rng.standard_normal((12, 2)))[0]
    taus = [q_u @ np.diag([1.0, 6e-6 if i == 0 else 0.0]) @ q_v.T for i in range(3)]
    wm = sum(taus)
    got = calibrate_gram(torch.from_numpy(wm), [torch.from_numpy(t) for t in taus], 1 / 3)
    assert got.path == "svd-fallback"
    assert _rel(got.delta, svc_reference(wm, taus, 1 / 3)) <= 1e-10
    well = [q_u @ np.diag([1.0, 3e-4 if i == 0 else 0.0]) @ q_v.T for i in range(3)]
    got = calibrate_gram(torch.from_numpy(sum(well)), [torch.from_numpy(t) for t in well], 1 / 3)
    assert got.path == "gram"
    assert _rel(got.delta, svc_reference(sum(well), well, 1 / 3)) <= 1e-10


@pytest.mark.parametrize("k", [2, 5])
def test_exactly_shared_task_vectors_are_calibrated_back_to_one_of_them(k):
    """K identical task vectors: TA holds K lambda copies of every direction, s = K lambda, and
    calibration returns exactly one task vector (both paths)."""
    tau = np.random.default_rng(10).standard_normal((14, 9))
    wm = 0.5 * k * tau
    taus = [torch.from_numpy(tau)] * k
    for got in (calibrate_singular_values(torch.from_numpy(wm), taus, 1 / k),
                calibrate_gram(torch.from_numpy(wm), taus, 1 / k)):
        assert _rel(got.delta, tau) <= 1e-12


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(2, 20), n=st.integers(2, 20), k=st.integers(1, 4), side=st.sampled_from(["column", "row"]),
    seed=st.integers(0, 2**31 - 1), target=st.sampled_from([None, 0]),
)
def test_one_gram_pass_serves_every_lambda_alpha_and_target_to_1e_10(m, n, k, side, seed, target):
    """The Grams of M = sum_i tau_i, solved for lambda * M with each alpha: the float64
    reference of calibrating lambda * M itself (negative and zero lambda included)."""
    from dist_svc.calibration import GramCalibration, oriented

    rng = np.random.default_rng(seed)
    taus = [rng.standard_normal((m, n)) for _ in range(k)]
    merged = sum(taus)
    transpose, gram_side = oriented((m, n), side)
    orient = (lambda x: x.T) if transpose else (lambda x: x)
    gram = GramCalibration(orient(merged).shape[1], k, 0.5, gram_side)
    gram.add(torch.from_numpy(orient(merged).copy()), [torch.from_numpy(orient(t).copy()) for t in taus])
    if gram.needs_projections:
        gram.add_projections([torch.from_numpy(orient(t).copy()) for t in taus])
    for lam in (0.3, 1.0, -1.7, 0.0):
        for alpha in (0.2, 1.0):
            solution = gram.solve(lam, alpha, target)
            want = svc_reference(lam * merged, taus, alpha, side, target)
            got = orient(solution.apply(torch.from_numpy(orient(merged).copy())).numpy())
            if solution.trusted:
                assert _rel(got, want) <= 1e-10, (lam, alpha)
            assert np.allclose(solution.singular_values.numpy(),
                               np.linalg.svd(lam * merged, compute_uv=False)[:len(solution.singular_values)],
                               rtol=1e-9, atol=1e-12)
