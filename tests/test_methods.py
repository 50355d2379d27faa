"""Base methods against direct numpy implementations of their definitions, and their invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_svc.methods import METHODS, ModelParams, Where
from dist_svc.methods.random import stream_key, uniform
from dist_svc.methods.sparse import dare, random_drop
from dist_svc.methods.spectral import iso_c, iso_cts, star, tsv
from tests.reference import iso_c_reference, iso_cts_reference, star_reference, ties_reference, tsv_reference


def _taus(k=3, shape=(18, 11), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(k)]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _run(method, taus, models, params, name="w"):
    ts = [torch.from_numpy(t) for t in taus]
    spec = METHODS[method]
    full = {p: s.default for p, s in spec.parameters.items()} | params
    idx = lambda: torch.arange(ts[0].numel()).view(ts[0].shape)  # noqa: E731
    return spec.merge(ts, models, full, Where(name, idx)).numpy()


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("densities", [[1.0, 1.0, 1.0], [0.2, 0.5, 0.9]])
def test_ties_matches_its_definition(normalize, densities):
    taus = _taus()
    weights = [1.0, 0.5, 2.0]
    models = [ModelParams(w, d) for w, d in zip(weights, densities)]
    got = _run("ties", taus, models, {"lambda": 0.7, "normalize": normalize})
    assert _rel(got, ties_reference(taus, weights, densities, 0.7, normalize)) <= 1e-14


def test_dare_masks_depend_on_element_index_only_not_on_blocks_or_layout():
    tau = torch.from_numpy(np.random.default_rng(1).standard_normal((40, 30)))
    key = stream_key(7, "model.layers.0.mlp.up_proj.weight", 1)
    idx = torch.arange(tau.numel()).view(40, 30)
    whole = random_drop(tau, 0.3, key, idx)
    rows = torch.cat([random_drop(tau[r:r + 7], 0.3, key, idx[r:r + 7]) for r in range(0, 40, 7)])
    cols_t = torch.cat([random_drop(tau[:, c:c + 4].T, 0.3, key, idx[:, c:c + 4].T) for c in range(0, 30, 4)]).T
    assert torch.equal(whole, rows) and torch.equal(whole, cols_t)
    kept = whole != 0
    assert torch.allclose(whole[kept], tau[kept] / 0.3)  # rescaled by 1/density
    other = random_drop(tau, 0.3, stream_key(8, "model.layers.0.mlp.up_proj.weight", 1), idx)
    assert not torch.equal(kept, other != 0)  # another seed, another mask


def test_dare_keeps_about_density_of_the_entries_uniformly():
    n = 400_000
    u = uniform(stream_key(0, "t", 0), torch.arange(n))
    assert abs(float(u.mean()) - 0.5) < 5 * (1 / 12 / n) ** 0.5
    hist = torch.histc(u.float(), bins=10, min=0, max=1) / n
    assert (hist - 0.1).abs().max() < 5 * (0.1 * 0.9 / n) ** 0.5
    for density in (0.1, 0.5, 0.8):
        frac = float((u < density).double().mean())
        assert abs(frac - density) < 5 * (density * (1 - density) / n) ** 0.5


def test_dare_ties_is_ties_consensus_over_dare_drops():
    taus = _taus(seed=2)
    ts = [torch.from_numpy(t) for t in taus]
    idx = torch.arange(ts[0].numel()).view(ts[0].shape)
    weights, densities = [1.0, 1.0, 0.5], [0.5, 0.6, 0.7]
    got = dare(ts, weights, densities, "x", idx, seed=3, lam=1.0, consensus=True, normalize=True)
    dropped = [random_drop(t, d, stream_key(3, "x", i), idx).numpy() for i, (t, d) in enumerate(zip(ts, densities))]
    assert _rel(got, ties_reference(dropped, weights, [1, 1, 1], 1.0, True)) <= 1e-14


@pytest.mark.parametrize("shape", [(18, 11), (11, 18)])
def test_tsv_matches_its_definition_and_keeps_the_task_spectra(shape):
    taus = _taus(3, shape)
    got = tsv([torch.from_numpy(t) for t in taus], lam=1.0).numpy()
    assert _rel(got, tsv_reference(taus)) <= 1e-12
    keep = min(shape) // 3
    kept = np.sort(np.concatenate([np.linalg.svd(t, compute_uv=False)[:keep] for t in taus]))[::-1]
    # The concatenated U and V are orthogonalised, so the kept singular values are the merge's.
    assert np.linalg.svd(got, compute_uv=False)[: 3 * keep] == pytest.approx(kept, rel=1e-10)


def test_iso_c_has_a_flat_spectrum_at_the_mean_singular_value():
    taus = _taus()
    got = iso_c([torch.from_numpy(t) for t in taus]).numpy()
    assert _rel(got, iso_c_reference(taus)) <= 1e-12
    s_sum = np.linalg.svd(np.sum(taus, 0), compute_uv=False)
    assert np.linalg.svd(got, compute_uv=False) == pytest.approx(np.full(len(s_sum), s_sum.mean()), rel=1e-10)


@pytest.mark.parametrize("fraction", [0.8, 0.5])
def test_iso_cts_matches_its_definition_and_is_flat(fraction):
    taus = _taus(3, (24, 20), seed=4)
    got = iso_cts([torch.from_numpy(t) for t in taus], common_fraction=fraction).numpy()
    assert _rel(got, iso_cts_reference(taus, common_fraction=fraction)) <= 1e-12
    s = np.linalg.svd(got, compute_uv=False)
    rank = int(fraction * 20) + 3 * ((20 - int(fraction * 20)) // 3)
    assert s[:rank] == pytest.approx(np.full(rank, s[0]), rel=1e-10)


def test_star_matches_its_definition_and_restores_each_nuclear_norm():
    taus = _taus(2, seed=5)
    got = star([torch.from_numpy(t) for t in taus], eta=0.4).numpy()
    assert _rel(got, star_reference(taus, eta=0.4)) <= 1e-12
    single = star([torch.from_numpy(taus[0])], eta=0.4).numpy()
    assert np.linalg.svd(single, compute_uv=False).sum() == pytest.approx(
        np.linalg.svd(taus[0], compute_uv=False).sum(), rel=1e-12)
    assert np.linalg.matrix_rank(single) < min(taus[0].shape)


def test_one_dimensional_tensors_fall_back_to_mean_or_sum():
    taus = [np.arange(5.0), np.ones(5)]
    ts = [torch.from_numpy(t) for t in taus]
    assert np.allclose(tsv(ts).numpy(), np.mean(taus, 0))
    assert np.allclose(star(ts).numpy(), np.mean(taus, 0))
    assert np.allclose(iso_c(ts).numpy(), np.sum(taus, 0))
    assert np.allclose(iso_cts(ts).numpy(), np.sum(taus, 0))
