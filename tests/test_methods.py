"""Merge methods against float64 numpy implementations of their definitions (tests/reference.py),
their invariants, and the contract every registered method keeps (docs/extending.md)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_svc.methods import METHODS, REQUIRED, Where
from dist_svc.methods.random import stream_key, uniform
from dist_svc.methods.sparse import magprune, random_drop, top_k_mask
from dist_svc.methods.spectral import iso_c, iso_cts, star, tsv
from tests.reference import (
    breadcrumbs_prune_reference, gta_reference, iso_c_reference, iso_cts_reference, karcher_reference,
    linear_reference, magnitude_reference, model_stock_reference, nuslerp_reference, sce_reference,
    slerp_reference, star_reference, ties_reference, tsv_reference,
)

REPO = Path(__file__).resolve().parent.parent


def _taus(k=3, shape=(18, 11), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(k)]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def call(name: str, tensors, base: int | None = None, tensor: str = "w", **given):
    """Run a registered method as the worker does: every declared parameter resolved (defaults
    for the rest), per-model ones as one value per input they apply to."""
    method = METHODS[name]
    inputs = [torch.as_tensor(np.asarray(t)) for t in tensors]
    p = resolved(name, len(inputs), base, given)
    where = Where(tensor, lambda: torch.arange(inputs[0].numel()).view(inputs[0].shape), base)
    return method.merge(inputs, p, where).numpy()


def resolved(name: str, inputs: int, base: int | None, given) -> dict:
    """Every declared parameter of method `name` for one tensor of `inputs` inputs: `given`
    values (a list: one per input it applies to), defaults for the rest."""
    method = METHODS[name]
    fine_tunes = inputs - (base is not None and method.operates_on == "weights")
    p = {}
    for q in method.params:
        value = given.get(q.name, q.default)
        assert value is not REQUIRED, f"{name}: give {q.name}"
        if q.per_model:
            count = inputs if q.scope == "input" else fine_tunes
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,) * count
            assert len(value) == count
        p[q.name] = value
    return p


def sample_inputs(name: str) -> tuple[int, int | None]:
    """How many tensors the tests give a method (three where its contract allows) and which one
    is the base (for a method on weights that needs one)."""
    method = METHODS[name]
    if method.operates_on == "weights" and method.base == "required":
        return 1 + min(2, method.most_fine_tunes or 2), 0
    if method.operates_on == "weights":  # the base, if any, is one input among the others
        return min(3, method.max_inputs or 3), None
    return min(3, method.max_fine_tunes or 3), None


# -- every method against its definition ------------------------------------------------------------

W = [1.0, 0.5, 2.0]
D = [0.2, 0.5, 0.9]


def _gta(taus, prune, weights=W, lam=1.0, normalize=False, consensus=False):
    return gta_reference([prune(t, i) for i, t in enumerate(taus)], weights, lam, normalize, consensus)


CASES = [
    # (method, given parameters, base index for methods on weights, reference(tensors))
    ("task_arithmetic", {"weight": W, "lambda": 0.7}, None, lambda x: 0.7 * sum(w * t for w, t in zip(W, x))),
    ("task_arithmetic", {"weight": W, "normalize": True}, None, lambda x: sum(w * t for w, t in zip(W, x)) / sum(W)),
    ("ties", {"weight": W, "density": D, "lambda": 0.7}, None,
     lambda x: ties_reference(x, W, D, 0.7, True)),
    ("ties", {"weight": W, "density": D, "rescale": True, "normalize": False}, None,
     lambda x: _gta(x, lambda t, i: magnitude_reference(t, D[i], rescale=True), consensus=True)),
    ("breadcrumbs", {"weight": W, "density": D, "gamma": [0.01, 0.1, 0.05]}, None,
     lambda x: _gta(x, lambda t, i: breadcrumbs_prune_reference(t, D[i], [0.01, 0.1, 0.05][i]))),
    ("breadcrumbs_ties", {"weight": W, "density": 0.6, "gamma": 0.1, "rescale": True, "normalize": True}, None,
     lambda x: _gta(x, lambda t, i: breadcrumbs_prune_reference(t, 0.6, 0.1, True), normalize=True, consensus=True)),
    # DELLA with density 1 keeps everything: the sign election and weights are what remains.
    ("della", {"weight": W, "density": 1.0}, None, lambda x: _gta(x, lambda t, i: t, normalize=True, consensus=True)),
    ("della_linear", {"weight": W, "density": 1.0, "lambda": 0.5}, None, lambda x: _gta(x, lambda t, i: t, lam=0.5)),
    ("sce", {}, None, lambda x: sce_reference(x)),
    ("sce", {"select_topk": 0.3}, None, lambda x: sce_reference(x, 0.3)),
    ("linear", {"weight": W}, None, lambda x: linear_reference(x, W)),
    ("linear", {"weight": W, "normalize": False}, None, lambda x: linear_reference(x, W, normalize=False)),
    ("passthrough", {"scale": 0.5}, None, lambda x: 0.5 * x[0]),
    ("slerp", {"t": 0.3}, 1, lambda x: slerp_reference(0.3, x[1], x[0])),
    ("nuslerp", {"weight": [1.0, 3.0]}, None, lambda x: nuslerp_reference(0.75, x[0], x[1])),
    ("nuslerp", {"weight": [1.0, 3.0], "nuslerp_flatten": False}, None,
     lambda x: nuslerp_reference(0.75, x[0], x[1], flatten=False)),
    ("nuslerp", {"weight": [2.0, 1.0], "nuslerp_flatten": False, "nuslerp_row_wise": True}, None,
     lambda x: nuslerp_reference(1 / 3, x[0], x[1], row_wise=True, flatten=False)),
    ("karcher", {}, None, lambda x: karcher_reference(x)),
    ("karcher", {"max_iter": 50, "tol": 1e-9}, None, lambda x: karcher_reference(x, 50, 1e-9)),
    ("model_stock", {}, 0, lambda x: model_stock_reference(x[0], x[1:])),
    ("model_stock", {"filter_wise": True}, 2, lambda x: model_stock_reference(x[2], x[:2], filter_wise=True)),
    ("tsv", {"lambda": 0.9}, None, lambda x: tsv_reference(x, 0.9)),
    ("iso_c", {}, None, lambda x: iso_c_reference(x)),
    ("iso_cts", {"common_fraction": 0.5}, None, lambda x: iso_cts_reference(x, common_fraction=0.5)),
    ("star", {"eta": 0.4}, None, lambda x: star_reference(x, eta=0.4)),
]


@pytest.mark.parametrize("name, given, base, reference", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_every_method_matches_its_float64_definition(name, given, base, reference):
    count, _ = sample_inputs(name)
    tensors = _taus(count, seed=len(name))
    if name in ("slerp", "model_stock", "karcher"):  # weights near each other, as fine-tunes are
        tensors = [tensors[0] + 0.3 * t for t in tensors]
    got = call(name, tensors, base, **given)
    # float64 throughout: the reference and the method differ by rounding only (SVD-based and
    # iterative methods: a few more roundings, still far below 1e-10).
    assert _rel(got, reference(tensors)) <= 1e-10, name


def test_every_registered_method_is_checked_against_a_reference_here():
    """Each method of the package has a float64 reference case in CASES (DARE: tests below)."""
    tested = {c[0] for c in CASES} | {"dare_linear", "dare_ties"}
    untested = [f"{name} ({METHODS[name].fn.__module__})" for name in METHODS if name not in tested]
    assert not untested, f"no float64 reference case in tests/test_methods.py: CASES for {', '.join(untested)}"
    assert not tested - set(METHODS), f"CASES names methods not registered: {', '.join(tested - set(METHODS))}"


def documented(name: str, docs: Path = REPO / "docs" / "methods.md") -> None:
    """docs/methods.md has a row for method `name`."""
    table = docs.read_text()
    assert re.search(rf"^\| `{re.escape(name)}` \|", table, re.M), (
        f"docs/methods.md has no row for {name} (registered in {METHODS[name].fn.__module__}); add "
        f"'| `{name}` | ...' to its table of methods")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_has_its_row_in_the_docs(name):
    documented(name)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_method_leaves_its_inputs_as_they_were_and_gives_the_same_bytes_twice(name):
    """The worker forms task vectors in place and calibrates against them after the merge."""
    leaves_its_inputs_and_repeats_itself(name)


def leaves_its_inputs_and_repeats_itself(name: str) -> None:
    count, base = sample_inputs(name)
    tensors = [t + 1.0 for t in _taus(count, (12, 9), seed=3)]
    given = dict(METHODS[name].sample)
    before = [t.copy() for t in tensors]
    first = call(name, tensors, base, **given)
    assert all(np.array_equal(a, b) for a, b in zip(tensors, before))
    assert np.array_equal(first, call(name, tensors, base, **given))
    assert first.shape == tensors[0].shape


def streamed(name: str) -> bool:
    """Whether method `name` with its sample setting works on blocks smaller than a tensor."""
    m = METHODS[name]
    return m.granularity({p.name: m.sample.get(p.name, p.default) for p in m.shared_params}) != "tensor"


@pytest.mark.parametrize("name", [n for n in sorted(METHODS) if streamed(n)])
def test_streamed_methods_give_the_same_result_block_by_block(name):
    """What a method declares it needs is what it uses: an element-wise method on any block of
    elements, a row-local one on blocks of whole rows, gives the whole tensor's result."""
    gives_the_same_result_block_by_block(name)


def gives_the_same_result_block_by_block(name: str) -> None:
    method = METHODS[name]
    count, base = sample_inputs(name)
    tensors = _taus(count, (20, 7), seed=5)
    given = dict(method.sample)
    weight = method.param("weight")
    if weight is not None and weight.per_model and base is None:  # unequal weights
        given["weight"] = [1.0, 2.0, 0.5][:count]
    p = resolved(name, count, base, given)
    ts = [torch.from_numpy(t) for t in tensors]
    idx = torch.arange(140).view(20, 7)
    whole = method.merge(ts, p, Where("w", lambda: idx, base))
    step = 3
    blocks = torch.cat([method.merge([t[r:r + step] for t in ts], p, Where("w", lambda r=r: idx[r:r + step], base))
                        for r in range(0, 20, step)])
    assert torch.equal(whole, blocks)


# -- TIES and its relatives: what is kept ------------------------------------------------------------

def test_ties_ties_at_the_threshold_go_to_the_lowest_indices():
    """Equal magnitudes at the threshold: mergekit's torch.argsort leaves the choice to the sort
    implementation (not stable beyond a few elements on a CPU); dist-svc keeps the lowest
    flat indices, on every device."""
    tau = torch.tensor([0.5, -1.0, 0.5, 2.0, -0.5, 0.5, 0.1])
    kept = top_k_mask(tau.abs(), 4)
    assert kept.tolist() == [True, True, True, True, False, False, False]
    big = torch.zeros(10_000)
    big[::7] = 1.0  # 1429 equal magnitudes, 1000 kept: the first 1000 of them
    assert torch.nonzero(top_k_mask(big, 1000)).flatten().tolist() == list(range(0, 7000, 7))


def _bf16_task_vector(shape=(64, 96), seed=0) -> torch.Tensor:
    """A fine-tune's task vector as bf16 checkpoints give it (in the float32 compute dtype): the
    difference of two bf16 tensors, so that many magnitudes are exactly equal."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen).to(torch.bfloat16)
    fine_tuned = (base.float() + 0.01 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    return fine_tuned.float() - base.float()


def _in_selection_order(values) -> np.ndarray:
    """The rule, in float64 numpy: larger first; equal values by flat index, lowest first."""
    return np.argsort(-np.asarray(values, np.float64).ravel(), kind="stable")


def _tied_across(values, cuts) -> np.ndarray:
    """Where the rule decides: entries equal to a value that straddles a cut of the selection
    order (the same value just before and just after it)."""
    flat = np.asarray(values, np.float64).ravel()
    ordered = flat[_in_selection_order(flat)]
    tied = np.zeros(flat.size, bool)
    for c in cuts:
        if 0 < c < flat.size and ordered[c - 1] == ordered[c]:
            tied |= flat == ordered[c]
    return tied.reshape(np.shape(values))


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "sce"])
def test_magnitude_selection_on_bf16_ties_keeps_the_lowest_indices_and_differs_from_mergekit_only_there(method):
    """bf16 task vectors hold many equal magnitudes, and where a selection's cut falls among
    them the rule decides: the k largest, and of the equal ones at the cut the lowest flat
    indices (a window of that order for breadcrumbs; by variance for SCE). Checked against the
    rule written with a stable sort, and against mergekit 0.1.5's torch.argsort/topk, which may
    choose other entries among those tied at a cut and nowhere else."""
    tau = _bf16_task_vector()
    n = tau.numel()
    if method == "ties":
        got = call("ties", [tau], weight=1.0, density=0.3)
        values, cuts = tau.abs(), [max(1, int(0.3 * n))]
        window = (0, cuts[0])
    elif method == "breadcrumbs":
        got = call("breadcrumbs", [tau], weight=1.0, density=0.3, gamma=0.05)
        values = tau.abs()
        skip, target = int(0.05 * n), int(0.3 * n)
        cuts, window = [skip, skip + target], (skip, skip + target)
    else:  # a second task of zeros: the variance is tau^2 / 4, its ties are tau's
        got = call("sce", [tau, torch.zeros_like(tau)], select_topk=0.3)
        values = torch.var(torch.stack([tau, torch.zeros_like(tau)]), dim=0, unbiased=False)
        cuts = [int(torch.count_nonzero(values) * 0.3)]
        window = (0, cuts[0])
    expected = np.zeros(n, bool)
    expected[_in_selection_order(values)[window[0]:window[1]]] = True
    expected = expected.reshape(tau.shape)
    kept = got != 0
    assert np.array_equal(kept, expected & (tau.numpy() != 0))
    np.testing.assert_allclose(got, np.where(expected, tau.numpy(), 0.0), rtol=1e-6, atol=0)
    tied = _tied_across(values, cuts)
    assert (tied & expected).any() and (tied & ~expected).any()  # the cut does fall among equal values

    pytest.importorskip("mergekit", reason="comparing with mergekit needs it installed")
    from mergekit.merge_methods.sce import sce_mask
    from mergekit.sparsify import magnitude, magnitude_outliers

    if method == "ties":
        theirs = magnitude(tau, 0.3) != 0
    elif method == "breadcrumbs":
        theirs = magnitude_outliers(tau, 0.3, gamma=0.05) != 0
    else:
        theirs = sce_mask(torch.stack([tau, torch.zeros_like(tau)]), 0.3).bool() & (tau != 0)
    differ = theirs.numpy() != kept
    assert not (differ & ~tied).any()


def test_a_density_too_small_for_one_entry_still_keeps_the_largest():
    """mergekit keeps max(1, int(density * n)) entries for any positive density."""
    tau = np.array([[0.1, -3.0, 0.2], [0.0, 0.4, -0.3]])
    got = call("ties", [tau], weight=1.0, density=0.01)
    assert np.array_equal(got, np.array([[0, -3.0, 0], [0, 0, 0]]))
    assert np.array_equal(call("ties", [tau], weight=1.0, density=0.0), np.zeros_like(tau))


def test_ties_rescale_restores_each_pruned_task_vectors_l1_norm():
    taus = _taus(1, (30, 10), seed=7)
    got = call("ties", taus, weight=1.0, density=0.25, rescale=True)
    assert np.abs(got).sum() == pytest.approx(np.abs(taus[0]).sum(), rel=1e-12)
    assert np.count_nonzero(got) == 75


# -- random methods (DARE, DELLA): counter-based random numbers ---------------------------------------

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


@pytest.mark.parametrize("name, consensus", [("dare_ties", True), ("dare_linear", False)])
def test_dare_is_its_drop_then_the_combination(name, consensus):
    taus = _taus(seed=2)
    idx = torch.arange(taus[0].size).view(taus[0].shape)
    weights, densities = [1.0, 1.0, 0.5], [0.5, 0.6, 0.7]
    got = call(name, taus, weight=weights, density=densities, seed=3, normalize=True)
    dropped = [random_drop(torch.from_numpy(t), d, stream_key(3, "w", i), idx).numpy()
               for i, (t, d) in enumerate(zip(taus, densities))]
    assert _rel(got, gta_reference(dropped, weights, 1.0, True, consensus)) <= 1e-14


@pytest.mark.parametrize("name, given", [
    ("dare_ties", {"density": [0.5, 0.6, 0.7], "weight": [1.0, 0.5, 2.0], "normalize": True}),
    ("dare_linear", {"density": 0.4}),
    ("della", {"density": [0.5, 0.6, 0.4], "epsilon": 0.1, "weight": [1.0, 0.5, 2.0]}),
    ("della_linear", {"density": 0.3, "epsilon": 0.2}),
])
def test_dare_and_della_on_a_block_larger_than_a_cpu_piece_are_the_unsplit_computation_bit_for_bit(
        name, given, monkeypatch):
    """On a CPU a block is merged in pieces of whole rows that stay in cache
    (`sparse.by_rows`): the same bits as the block in one piece, in rows and in the oriented
    columns of a calibrated wide matrix."""
    from dist_svc.methods import sparse

    rng = np.random.default_rng(4)
    taus = [torch.from_numpy(rng.standard_normal((300, 257)).astype(np.float32)) for _ in range(3)]
    shape = taus[0].shape
    p = resolved(name, 3, None, {"seed": 5, **given})
    blocks = [(taus, torch.arange(taus[0].numel()).view(shape)),
              ([t[:, 60:200].T for t in taus], torch.arange(taus[0].numel()).view(shape)[:, 60:200].T)]
    for tensors, idx in blocks:
        assert tensors[0].numel() > sparse._CHUNK_ELEMENTS  # two pieces or more
        got = METHODS[name].merge(tensors, p, Where("w", lambda: idx))
        with monkeypatch.context() as m:
            m.setattr(sparse, "_CHUNK_ELEMENTS", 1 << 40)
            want = METHODS[name].merge(tensors, p, Where("w", lambda: idx))
        assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)


def test_della_keeps_larger_magnitudes_more_often_by_their_rank_in_the_row():
    """MAGPRUNE: rank r of n in a row is kept with probability density - eps + 2 eps r/(n-1);
    kept entries are divided by it, so each entry's expectation is itself."""
    rows, n, density, eps = 4000, 50, 0.5, 0.3
    rng = np.random.default_rng(11)
    tau = torch.from_numpy(rng.standard_normal((rows, n)))
    idx = torch.arange(rows * n).view(rows, n)
    out = magprune(tau, density, eps, stream_key(0, "w", 0), idx)
    ranks = tau.abs().argsort(dim=1).argsort(dim=1).numpy()
    kept = (out != 0).numpy()
    for r in (0, n // 2, n - 1):
        p = density - eps + 2 * eps * r / (n - 1)
        frac = kept[ranks == r].mean()
        assert abs(frac - p) < 5 * (p * (1 - p) / rows) ** 0.5, (r, frac, p)
    probability = density - eps + 2 * eps * ranks / (n - 1)
    np.testing.assert_allclose(out.numpy()[kept], tau.numpy()[kept] / probability[kept], rtol=1e-15)
    # unbiased: the mean of out / tau over many entries is 1
    assert abs(float((out / tau).mean()) - 1) < 5 * float(((out / tau).std()) / (rows * n) ** 0.5)


def test_della_refuses_keep_probabilities_outside_0_1():
    check = METHODS["della"].check
    assert check({"density": (0.5, 0.9), "epsilon": (0.1, 0.15)}) is not None
    assert check({"density": (0.5, 0.5), "epsilon": (0.1, 0.4)}) is None
    assert check({"density": (1.0,), "epsilon": (0.9,)}) is None  # density 1 keeps everything


# -- the spectral methods -----------------------------------------------------------------------------

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
def test_iso_cts_is_flat(fraction):
    taus = _taus(3, (24, 20), seed=4)
    got = iso_cts([torch.from_numpy(t) for t in taus], common_fraction=fraction).numpy()
    s = np.linalg.svd(got, compute_uv=False)
    rank = int(fraction * 20) + 3 * ((20 - int(fraction * 20)) // 3)
    assert s[:rank] == pytest.approx(np.full(rank, s[0]), rel=1e-10)


def test_star_restores_each_nuclear_norm():
    taus = _taus(2, seed=5)
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


def test_the_random_numbers_of_a_seed_never_change():
    """A merge with random drops is resumed, and rerun by later versions, with the same numbers:
    these are pinned."""
    got = uniform(stream_key(0, "t", 0), torch.arange(4)).tolist()
    assert got == [0.7546118677128106, 0.11625501234084368, 0.24908749433234334, 0.06333101959899068]
    far = uniform(stream_key(7, "w", 2), torch.tensor([2**33 + 5, 5]))  # indices beyond 2^32 use their high bits
    assert far[0] != far[1]
