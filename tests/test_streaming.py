"""Methods that need whole tensors, streamed in passes over blocks (dist_svc.methods.base.Passes):
the same values as the whole-tensor implementations they replaced (tests/reference.py, float32),
bit for bit where the order of operations allows, exact ties at the selection's cut included;
the passes each method makes; merges through the worker in small blocks, kept between passes or
read again, calibrated or not; and a unit's planned memory that does not grow with the tensor."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dist_svc import merge
from dist_svc.blocks import Block, flat_indices
from dist_svc.commands.demo import TinyLlama, make_family
from dist_svc.executors import LocalExecutor
from dist_svc.methods import METHODS, Where
from dist_svc.methods.base import Extent, drive
from tests import reference
from tests.conftest import file_bytes, run_cli, write_config
from tests.reference import load_checkpoint, load_output

W = [1.0, 0.5, 2.0]
D = [0.3, 0.5, 0.8]


def params(name: str, count: int, **given) -> dict:
    """Every declared parameter of the method, resolved as the worker resolves them."""
    method = METHODS[name]
    p = {}
    for q in method.params:
        value = given.get(q.name, q.default)
        if q.per_model:
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,) * count
        p[q.name] = value
    return p


def streamed(name: str, tensors: list[torch.Tensor], p: dict, base: int | None = None, step: int = 3,
             columns: bool = False) -> tuple[torch.Tensor, int]:
    """The method's streaming form over blocks of `step` rows (or, `columns`, of columns, oriented
    as the worker gives a wide matrix's blocks: transposed), as the worker drives it; the output
    and the number of passes over the blocks."""
    shape = tuple(tensors[0].shape)
    length = shape[1] if columns else shape[0]
    blocks = [Block(i, min(i + step, length), columns) for i in range(0, length, step)]

    def inputs(block):
        part = [t[:, block.start:block.stop].T if columns else t[block.start:block.stop] for t in tensors]
        return part, Where("w", lambda: flat_indices(shape, block, torch.device("cpu")), base)

    passes = 0

    def traverse():
        nonlocal passes
        passes += 1
        return (inputs(b) for b in blocks)

    output = drive(METHODS[name].passes, p, Extent("w", shape, base, not columns, tensors[0].dtype), traverse)
    each = output()
    parts = [each(*inputs(b)) for b in blocks]
    return (torch.cat([x.T for x in parts], dim=1) if columns else torch.cat(parts)), passes + 1


def bf16_values(count: int, shape=(40, 33), seed=0, scale=1.0) -> list[torch.Tensor]:
    """float32 tensors holding bf16 values: many equal magnitudes, as bf16 task vectors have."""
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(shape, generator=g)).bfloat16().float() for _ in range(count)]


def whole(name: str, tensors, p, base=None):
    where = Where("w", lambda: torch.arange(tensors[0].numel()).view(tensors[0].shape), base)
    return {
        "ties": reference.ties_whole, "breadcrumbs": reference.breadcrumbs_whole,
        "breadcrumbs_ties": lambda t, p, w: reference.breadcrumbs_whole(t, p, w, consensus=True),
        "sce": reference.sce_whole, "slerp": reference.slerp_whole, "nuslerp": reference.nuslerp_whole,
        "karcher": reference.karcher_whole, "model_stock": reference.model_stock_whole,
    }[name](tensors, p, where)


# (method, given parameters, inputs, base, exact: bit for bit, else the largest difference
#  relative to the largest magnitude of the output)
CASES = [
    ("ties", {"weight": W, "density": D}, 3, None, True),
    ("ties", {"weight": W, "density": [0.01, 1.0, 0.0], "lambda": 0.7, "normalize": False}, 3, None, True),
    ("ties", {"weight": W, "density": D, "rescale": True}, 3, None, 1e-6),
    ("breadcrumbs", {"weight": W, "density": D, "gamma": [0.01, 0.1, 0.05]}, 3, None, True),
    ("breadcrumbs_ties", {"weight": W, "density": 0.6, "gamma": 0.1, "rescale": True, "normalize": True}, 3, None,
     1e-6),
    ("sce", {}, 3, None, 1e-6),
    ("sce", {"select_topk": 0.3}, 3, None, 1e-6),
    ("slerp", {"t": 0.3}, 2, 1, 1e-6),
    ("nuslerp", {"weight": [1.0, 3.0]}, 2, None, 1e-6),
    ("nuslerp", {"weight": [2.0, 1.0], "nuslerp_flatten": False, "nuslerp_row_wise": True}, 2, None, 1e-6),
    ("karcher", {}, 3, None, 1e-6),
    ("karcher", {"max_iter": 50, "tol": 1e-9}, 3, None, 1e-6),
    ("model_stock", {}, 3, 0, 1e-6),
]


def _inputs(name, count, seed):
    tensors = bf16_values(count, seed=seed)
    if name in ("slerp", "model_stock", "karcher", "nuslerp"):  # weights near each other, as fine-tunes are
        tensors = [tensors[0] + 0.3 * t for t in tensors]
    return tensors


def _agree(got: torch.Tensor, want: torch.Tensor, exact, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, what
    if exact is True:
        assert torch.equal(got, want), f"{what}: {int((got != want).sum())} elements differ"
    else:
        worst = float((got.double() - want.double()).abs().max() / want.double().abs().max())
        assert worst <= exact, f"{what}: {worst:.3g}"


@pytest.mark.parametrize("name, given, count, base, exact", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_a_streamed_method_gives_the_whole_tensors_values_block_by_block(name, given, count, base, exact):
    """float32, blocks of 3 rows of 40 (and of 7 columns of 33, as a calibrated wide matrix is
    read), against the whole-tensor implementation the streaming form replaced."""
    tensors = _inputs(name, count, seed=len(name) + len(given))
    p = params(name, count - (base is not None), **given)
    want = whole(name, tensors, p, base)
    for columns, step in ((False, 3), (True, 7), (False, 40)):
        got, _ = streamed(name, tensors, p, base, step, columns)
        _agree(got, want, exact, f"{name} {'columns' if columns else 'rows'} of {step}")


def test_ties_at_the_cut_are_kept_lowest_flat_index_first_in_any_block_order():
    """bf16 magnitudes tie at the k-th largest: the streamed selection keeps exactly the
    whole-tensor order's choice (larger first, equal ones by flat index), in row blocks (a count
    of the ties before each block) and in column blocks (two more passes over the indices)."""
    tau = bf16_values(1, (64, 50), seed=7, scale=0.01)[0]
    flat = tau.abs().reshape(-1)
    for density in (0.1, 0.5, 0.9):
        k = int(density * flat.numel())
        kth = flat.sort(descending=True).values[k - 1]
        assert int((flat == kth).sum()) > 1 and int((flat > kth).sum()) < k - 1 or density == 0.9
        p = params("ties", 1, density=density)
        want = reference.ties_whole([tau], p, None)
        for columns, step in ((False, 5), (True, 3)):
            got, _ = streamed("ties", [tau], p, step=step, columns=columns)
            assert torch.equal(got, want), (density, columns, step)
        assert int((want != 0).sum()) == k  # exactly k kept, ties split at the cut


PASSES = [
    # (method, given, inputs, base, passes in row blocks, in column blocks with a split tie: one
    #  more per 16 bits of the flat index, here 1)
    ("ties", {"density": 0.3}, 3, None, 3, 4),
    ("ties", {"density": 0.3, "rescale": True}, 3, None, 4, 5),
    ("ties", {"density": 1.0}, 3, None, 1, 1),
    ("breadcrumbs_ties", {"density": 0.3, "gamma": 0.05}, 3, None, 3, 4),
    ("sce", {"select_topk": 0.3}, 3, None, 4, 4),  # variances of these inputs do not tie at the cut
    ("sce", {}, 3, None, 2, 2),
    ("slerp", {"t": 0.5}, 2, 0, 2, 2),
    ("nuslerp", {"weight": [1.0, 1.0]}, 2, None, 2, 2),
    ("karcher", {}, 3, None, 2, 2),
    ("model_stock", {}, 3, 0, 2, 2),
]


@pytest.mark.parametrize("name, given, count, base, rows, columns", PASSES, ids=[f"{c[0]}-{i}" for i, c in enumerate(PASSES)])
def test_each_method_reads_its_blocks_as_many_times_as_docs_methods_md_says(name, given, count, base, rows, columns):
    tensors = _inputs(name, count, seed=3)
    p = params(name, count - (base is not None), **given)
    assert streamed(name, tensors, p, base, 4)[1] == rows
    assert streamed(name, tensors, p, base, 4, columns=True)[1] == columns


def test_a_float64_selection_takes_four_digit_passes_and_the_same_choice():
    tensors = [t.double() for t in bf16_values(3, seed=11)]
    p = params("ties", 3, weight=W, density=D)
    got, passes = streamed("ties", tensors, p, step=6)
    assert passes == 5 and torch.equal(got, reference.ties_whole(tensors, p, None))


def test_sces_variance_is_torchs_bit_for_bit_on_every_block_layout():
    """SCE selects by mergekit's `torch.var(stack, dim=0, unbiased=False)`; dist-svc computes it
    faster (Welford in float64 over chunks of the block) and must keep every bit of it: a
    variance one ulp apart moves the selection's cut. float32 and float64, bf16 values (many
    ties, exact zeros), task vectors close to each other, 1 to 5 tasks, blocks of columns."""
    from dist_svc.methods.sparse import _variance

    g = torch.Generator().manual_seed(5)
    for count in (1, 2, 3, 5):
        spread = [torch.randn(300, 257, generator=g) * 10.0 ** e for e in (-4, 0, 3, -9, 1)][:count]
        near = [spread[0] + 1e-5 * t for t in spread]
        bf16 = [t.bfloat16().float() for t in spread]
        for taus in (spread, near, bf16, [t.double() for t in near], [t[:, 40:99].T for t in bf16]):
            before = [t.clone() for t in taus]
            want = torch.var(torch.stack(taus), dim=0, unbiased=False).abs()
            got = _variance(taus)
            assert got.dtype == want.dtype and torch.equal(got, want), (count, taus[0].dtype)
            assert all(torch.equal(a, b) for a, b in zip(taus, before))  # inputs untouched


# -- through the worker ---------------------------------------------------------------------------

ARCH = TinyLlama(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    base, fts = make_family(root, k=3, arch=ARCH, dtype=torch.bfloat16)
    return base, fts


def test_a_ties_merge_in_small_blocks_is_the_whole_tensor_ties_bit_for_bit(tmp_path, family):
    """Blocks of ~100 elements, kept between passes or read again each pass: every tensor is
    base + the whole-tensor TIES of the checkpoints' task vectors, rounded once."""
    base, fts = family
    cfg = write_config(tmp_path / "m.yaml", base, fts, merge_method="ties", dtype="float32", out_dtype="float32",
                       parameters={"density": 0.3, "normalize": True})
    merge(cfg, tmp_path / "kept", progress="off", calibrate=False, executor=LocalExecutor(block_elements=100))
    merge(cfg, tmp_path / "read", progress="off", calibrate=False,
          executor=LocalExecutor(block_elements=100, cache_bytes=0))
    assert file_bytes(tmp_path / "kept") == file_bytes(tmp_path / "read")
    b = load_checkpoint(base)
    models = [load_checkpoint(f) for f in fts]
    out = load_output(tmp_path / "kept")
    p = params("ties", 3, density=0.3)
    for name, merged in out.items():
        x0 = torch.from_numpy(b[name]).float()
        taus = [torch.from_numpy(m[name]).float() - x0 for m in models]
        want = reference.ties_whole(taus, p, None).add_(x0)
        assert torch.equal(merged, want), name


@pytest.mark.parametrize("method, parameters", [
    ("ties", {"density": 0.3}),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.05}),
    ("sce", {"select_topk": 0.5}),
    ("model_stock", {}),
    ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
])
def test_a_calibrated_streamed_merge_is_the_whole_tensor_one(tmp_path, family, monkeypatch, method, parameters):
    """The Gram pass takes the streamed method's blocks (columns of a wide matrix, rows of a tall
    one): the same tensors as the whole-tensor path (the method without its streaming form), to
    the Grams' float64 rounding."""
    base, fts = family
    fts = fts[:2] if method == "nuslerp" else fts
    cfg = write_config(tmp_path / "m.yaml", base, fts, merge_method=method, dtype="float32", out_dtype="float32",
                       parameters=parameters, calibrate=True)
    merge(cfg, tmp_path / "streamed", progress="off", executor=LocalExecutor(block_elements=200, cache_bytes=0))
    merge(cfg, tmp_path / "kept", progress="off", executor=LocalExecutor(block_elements=200))
    monkeypatch.setitem(METHODS, method, dataclasses.replace(METHODS[method], passes=None))
    merge(cfg, tmp_path / "whole", progress="off")
    ours, kept, theirs = (load_output(tmp_path / d) for d in ("streamed", "kept", "whole"))
    for name in theirs:
        for got in (ours[name], kept[name]):
            scale = float(theirs[name].abs().max())
            assert float((got - theirs[name]).abs().max()) <= 1e-5 * scale, name


# -- memory ---------------------------------------------------------------------------------------

def _frontier(tmp_path, rows: int, method: str = "ties"):
    from dist_svc.bench.suites import write_sparse_checkpoint

    shapes = {"model.embed_tokens.weight": (rows, 16384), "model.norm.weight": (16384,)}
    for d in ("base", "ft-1", "ft-2", "ft-3"):
        write_sparse_checkpoint(tmp_path / d, shapes)
    return write_config(tmp_path / "m.yaml", tmp_path / "base", [tmp_path / f"ft-{i}" for i in (1, 2, 3)],
                        merge_method=method, parameters={"density": 0.3}, calibrate=False)


def test_a_streamed_units_planned_memory_does_not_grow_with_the_tensor(tmp_path):
    from dist_svc.config import load_config
    from dist_svc.driver import plan_merge
    from dist_svc.memory import unit_footprint

    needs = []
    for rows in (32000, 128256):
        config = load_config(_frontier(tmp_path / str(rows), rows))
        unit = next(u for u in plan_merge(config).units if u.name == "model.embed_tokens.weight")
        needs.append(unit_footprint(unit, config).host)
    assert needs[0] == needs[1] < 2 << 30


def test_the_405b_dry_run_fits_a_ties_unit_of_its_embedding_in_24_gib(tmp_path):
    """Llama-3.1-405B's embedding, 128256 x 16384, K = 3 (headers over holes): whole tensors took
    ~130 GB; streamed, the largest unit fits a 24 GiB machine."""
    cfg = _frontier(tmp_path, 128256)
    report = run_cli("merge", cfg, tmp_path / "out", "--dry-run", "--memory-limit", "24GiB").stdout
    assert "does not fit the memory limit" not in report and "0 of those at once" not in report, report
    assert not (tmp_path / "out").exists()
