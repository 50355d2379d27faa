"""`dist-svc merge` end to end on real safetensors files, against a float64 reference."""

from __future__ import annotations

import json

import yaml

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dist_svc import merge
from dist_svc.executors import LocalExecutor
from tests.conftest import file_bytes, run_cli, write_config
from tests.contracts import ExecutorContract
from dist_svc.methods.random import stream_key, uniform
from tests.reference import (
    breadcrumbs_prune_reference, gta_reference, iso_c_reference, karcher_reference, linear_reference, load_checkpoint,
    load_output, merge_reference, model_stock_reference, nuslerp_reference, sce_reference, slerp_reference,
    star_reference, ties_reference, tsv_reference,
)

F32_EPS = float(np.finfo(np.float32).eps)


def ulps_apart(out: torch.Tensor, ref: np.ndarray) -> np.ndarray:
    """Distance of a float32 result from a float64 reference in units of the float32 spacing there."""
    ref32 = ref.astype(np.float32)
    return np.abs(out.numpy().astype(np.float64) - ref) / np.spacing(np.abs(ref32))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_float64_compute_equals_the_float64_reference_to_float32_rounding(tmp_path, family, k):
    base, fts = family(k)
    weights = [1.0 + 0.25 * i for i in range(k)]
    cfg = write_config(tmp_path / "m.yaml", base, fts, weights, parameters={"lambda": 0.7}, dtype="float64")
    report = merge(cfg, tmp_path / "out", shard_size="40KB", progress="off")
    out = load_output(tmp_path / "out")
    ref = merge_reference(base, fts, weights, lam=0.7)
    assert set(out) == set(ref)
    for name, tensor in out.items():
        assert tensor.dtype == torch.float32
        # Computed in float64 and rounded once: within one float32 spacing of the exact value.
        assert ulps_apart(tensor, ref[name]).max() <= 1.0, name
    calibrated = {n for n in out if out[n].ndim == 2 and "embed" not in n and "lm_head" not in n}
    assert set(report.calibration) == calibrated
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) >= 3


@pytest.mark.parametrize("k", [1, 3, 5])
def test_float32_compute_is_within_float32_error_of_the_reference(tmp_path, family, k):
    base, fts = family(k)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    merge(cfg, tmp_path / "out", shard_size="40KB", progress="off")
    out = load_output(tmp_path / "out")
    ref = merge_reference(base, fts, [1.0] * k)
    ref_ta = merge_reference(base, fts, [1.0] * k, calibrate=False)
    for name, tensor in out.items():
        delta = np.abs(ref[name] - load_checkpoint(base)[name]).max()
        # The task vectors and their sum are formed in float32 (relative error ~K eps each) and
        # calibration may scale them by up to 1/alpha = K; on top comes the final rounding.
        tol = 4 * k * k * F32_EPS * delta + np.spacing(np.abs(ref[name]).astype(np.float32))
        err = np.abs(tensor.numpy().astype(np.float64) - ref[name])
        assert (err <= tol).all(), f"{name}: max error {err.max():.3g}"
        if k > 1 and name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
            # Calibration really happened: plain TA is far outside the tolerance.
            assert np.abs(ref_ta[name] - ref[name]).max() > 1000 * tol.max()


def test_calibration_flag_overrides_the_config_and_bf16_output_keeps_base_dtype(tmp_path, family):
    base, fts = family(3, dtype=torch.bfloat16)
    cfg = write_config(tmp_path / "m.yaml", base, fts, calibrate=True)
    run_cli("merge", cfg, tmp_path / "out", "--no-calibrate")
    out = load_output(tmp_path / "out")
    ref = merge_reference(base, fts, [1.0] * 3, calibrate=False)
    for name, tensor in out.items():
        assert tensor.dtype == torch.bfloat16
        # TA in float32 of bf16 inputs (exact task vectors), then one rounding to bf16.
        expected = torch.from_numpy(ref[name]).to(torch.float32).to(torch.bfloat16)
        diff = (tensor.float() - expected.float()).abs()
        assert (diff <= expected.float().abs() * 2**-7).all(), name


def test_mergekit_task_arithmetic_yaml_runs_unchanged(tmp_path, family, monkeypatch):
    base, fts = family(2)
    monkeypatch.chdir(tmp_path)
    # Written as mergekit users write it: relative paths, the base also listed among the models
    # (mergekit leaves it out of the merge), normalize and lambda, compute and output dtypes.
    rel = lambda p: str(p.relative_to(tmp_path))  # noqa: E731
    (tmp_path / "mergekit.yaml").write_text(f"""
merge_method: task_arithmetic
base_model: {rel(base)}
models:
  - model: {rel(base)}
  - model: {rel(fts[0])}
    parameters:
      weight: 0.6
  - model: {rel(fts[1])}
    parameters:
      weight: 0.4
parameters:
  normalize: true
  lambda: 0.9
dtype: bfloat16
out_dtype: float16
""")
    run_cli("merge", "mergekit.yaml", "merged", "--no-calibrate", cwd=tmp_path)
    out = load_output(tmp_path / "merged")
    ref = merge_reference(base, fts, [0.6, 0.4], lam=0.9, normalize=True, calibrate=False)
    for name, tensor in out.items():
        assert tensor.dtype == torch.float16
        assert np.allclose(tensor.float().numpy(), ref[name], rtol=2**-10, atol=1e-7), name
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["torch_dtype"] == "float16"

    # The same file with calibration on (the default) runs too and differs where it should.
    run_cli("merge", "mergekit.yaml", "merged-svc", cwd=tmp_path)
    svc = load_output(tmp_path / "merged-svc")
    assert torch.equal(svc["model.norm.weight"], out["model.norm.weight"])
    assert not torch.equal(svc["model.layers.0.mlp.up_proj.weight"], out["model.layers.0.mlp.up_proj.weight"])


def test_output_is_a_hugging_face_checkpoint(tmp_path, family):
    base, fts = family(3)
    (base / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    merge(cfg, tmp_path / "out", shard_size="40KB", progress="off")
    out_dir = tmp_path / "out"
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    shards = sorted(out_dir.glob("model-*.safetensors"))
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    total = 0
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                assert index["weight_map"][name] == shard.name
                t = f.get_tensor(name)
                total += t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(load_checkpoint(base))
    for side in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (out_dir / side).read_bytes() == (base / side).read_bytes()
    assert not list(out_dir.glob("*.partial")) and not list(out_dir.glob(".*tmp"))


def test_the_same_merge_twice_gives_the_same_bytes(tmp_path, family):
    base, fts = family(3)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    merge(cfg, tmp_path / "a", progress="off")
    merge(cfg, tmp_path / "b", progress="off")
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")


@pytest.mark.parametrize("cache_bytes", [0, 1 << 30], ids=["re-read", "cached"])
def test_streaming_in_small_blocks_matches_the_reference(tmp_path, family, cache_bytes):
    """Tiny blocks (a few rows, or columns of the wide k/v projections) exercise the row-block
    Gram accumulation, the transposed path and pass 2 with and without the block cache."""
    base, fts = family(3)
    cfg = write_config(tmp_path / "m.yaml", base, fts, parameters={"lambda": 0.5}, dtype="float64")
    executor = LocalExecutor(block_elements=100, cache_bytes=cache_bytes)
    report = merge(cfg, tmp_path / "out", executor=executor, progress="off")
    out = load_output(tmp_path / "out")
    ref = merge_reference(base, fts, [1.0] * 3, lam=0.5)
    for name, tensor in out.items():
        assert ulps_apart(tensor, ref[name]).max() <= 1.0, name
    assert {c["path"] for c in report.calibration.values()} == {"gram"}


def _dare_ties_reference(densities, seed):
    def method(name, taus):
        idx = torch.arange(taus[0].size).view(taus[0].shape)
        dropped = [np.where(uniform(stream_key(seed, name, i), idx).numpy() < d, t / d, 0.0)
                   for i, (t, d) in enumerate(zip(taus, densities))]
        return ties_reference(dropped, [1.0] * len(taus), [1.0] * len(taus), 1.0, normalize=False)
    return method


def _della_reference(density, epsilon, seed):
    """MAGPRUNE from its definition: rank in the row (of equal magnitudes the lower index ranks
    higher), keep probability density - epsilon + 2 epsilon rank / (n - 1), kept entries divided
    by it; the random numbers are dist-svc's counter-based ones (methods.random)."""
    def method(name, taus):
        out = []
        for i, t in enumerate(taus):
            rows = t.reshape(1, -1) if t.ndim < 2 else t
            n = rows.shape[1]
            descending = np.argsort(np.argsort(-np.abs(rows), axis=1, kind="stable"), axis=1)
            rank = (n - 1 - descending) / max(n - 1, 1)
            p = density - epsilon + 2 * epsilon * (rank if n > 1 else 0.5)
            u = uniform(stream_key(seed, name, i), torch.arange(rows.size).view(rows.shape)).numpy()
            out.append(np.where(u < p, rows / p, 0.0).reshape(t.shape))
        return gta_reference(out, [1.0] * len(taus), 1.0, normalize=True, consensus=True)
    return method


# (method, parameters, each fine-tune's parameters, the reference, alpha: None = 1/K, False = no
# calibration; `weights=` marks references on weights: (name, base, fine-tunes) -> merged weights)
CALIBRATED = [
    ("ties", {"density": 0.5, "lambda": 0.8}, [{}, {"density": 0.3}, {}],
     lambda n, t: ties_reference(t, [1] * 3, [0.5, 0.3, 0.5], 0.8), None),
    ("dare_ties", {"density": 0.6, "seed": 11}, [{}, {}, {}], _dare_ties_reference([0.6] * 3, 11), None),
    ("della", {"density": 0.6, "epsilon": 0.2, "seed": 4}, [{}, {}, {}], _della_reference(0.6, 0.2, 4), None),
    ("breadcrumbs_ties", {"density": 0.7, "gamma": 0.05}, [{}, {}, {}],
     lambda n, t: gta_reference([breadcrumbs_prune_reference(x, 0.7, 0.05) for x in t], [1] * 3, consensus=True),
     None),
    ("sce", {"select_topk": 0.5}, [{}, {}, {}], lambda n, t: sce_reference(t, 0.5), None),
    ("tsv", {"lambda": 0.9}, [{}, {}, {}], lambda n, t: tsv_reference(t, 0.9), 1.0),
    # Iso-C's spectrum is flat, so its singular directions are not unique and calibrating it
    # depends on the basis an SVD picks (docs/calibration.md): checked with calibration off.
    ("iso_c", {}, [{}, {}, {}], lambda n, t: iso_c_reference(t), False),
    ("star", {"eta": 0.5}, [{}, {}, {}],
     lambda n, t: star_reference(t, eta=0.5) if t[0].ndim == 2 else np.mean(t, 0), None),
    # Methods on weights, with base_model: the calibrated delta is merged - base.
    ("linear", {"weight": 1.0}, [{"weight": 1.0}, {"weight": 0.5}, {"weight": 2.0}],
     ("weights", lambda n, b, x: linear_reference([*x, b], [1.0, 0.5, 2.0, 1.0])), None),
    ("model_stock", {}, [{}, {}, {}], ("weights", lambda n, b, x: model_stock_reference(b, x)), None),
    ("karcher", {}, [{}, {}, {}], ("weights", lambda n, b, x: karcher_reference([*x, b])), None),
    ("slerp", {"t": 0.4}, [{}], ("weights", lambda n, b, x: slerp_reference(0.4, b, x[0])), None),
    ("nuslerp", {}, [{"weight": 1.0}, {"weight": 3.0}], lambda n, t: nuslerp_reference(0.75, t[0], t[1]), None),
]


@pytest.mark.parametrize("method, params, model_params, reference, alpha", CALIBRATED, ids=[c[0] for c in CALIBRATED])
def test_every_method_with_calibration_equals_its_float64_reference(tmp_path, family, method, params, model_params,
                                                                      reference, alpha):
    """SVC needs only the merged delta (merged - base) and the task vectors: it applies to every
    method with a base model, streamed or not."""
    base, fts = family(3)
    fts = fts[:len(model_params)]
    cfg = {"merge_method": method, "base_model": str(base), "dtype": "float64", "parameters": params,
           "models": [{"model": str(f), "parameters": p} for f, p in zip(fts, model_params)],
           "calibrate": alpha is not False}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    report = merge(tmp_path / "m.yaml", tmp_path / "out", shard_size="40KB", progress="off",
                   executor=LocalExecutor(block_elements=300))  # small blocks: random drops must not depend on them
    out = load_output(tmp_path / "out")
    on_weights = isinstance(reference, tuple)
    ref = merge_reference(base, fts, [1.0] * len(fts), alpha=alpha or None, calibrate=alpha is not False,
                          method=None if on_weights else reference, weights_method=reference[1] if on_weights else None)
    for name, tensor in out.items():
        err = np.abs(tensor.numpy().astype(np.float64) - ref[name])
        # float64 all the way, one rounding to float32 (SVD-based and iterative methods: 1e-12 of
        # the delta more).
        tol = np.spacing(np.abs(ref[name]).astype(np.float32)) + 1e-12 * np.abs(ref[name]).max()
        assert (err <= tol).all(), f"{method} {name}: {err.max():.3g}"
    assert bool(report.calibration) == (alpha is not False)


def test_a_matrix_the_gram_cannot_resolve_is_merged_by_full_svd_and_recorded(tmp_path):
    """The worker's fallback: after pass 1 the Gram path finds a direction of one task at 2e-6 of
    the largest singular value (too few digits in its Gram eigenvalue), so this matrix is
    recomputed by SVD."""
    from dist_svc.commands.demo import write_hf_checkpoint

    rng = np.random.default_rng(3)
    q_u = np.linalg.qr(rng.standard_normal((20, 2)))[0]
    q_v = np.linalg.qr(rng.standard_normal((12, 2)))[0]
    base = {"w": torch.from_numpy(0.1 * rng.standard_normal((20, 12))), "g": torch.ones(12, dtype=torch.float64)}
    write_hf_checkpoint(tmp_path / "base", base)
    fts = []
    for i in range(3):
        tau = q_u @ np.diag([1.0, 6e-6 if i == 0 else 0.0]) @ q_v.T
        write_hf_checkpoint(tmp_path / f"ft-{i}", {"w": base["w"] + torch.from_numpy(tau), "g": base["g"] * (1 + i)})
        fts.append(tmp_path / f"ft-{i}")
    cfg = write_config(tmp_path / "m.yaml", tmp_path / "base", fts, dtype="float64")
    report = merge(cfg, tmp_path / "out", progress="off")
    assert report.calibration["w"]["path"] == "svd-fallback"
    out = load_output(tmp_path / "out")
    ref = merge_reference(tmp_path / "base", fts, [1.0] * 3)
    assert out["w"].dtype == torch.float64
    assert np.abs(out["w"].numpy() - ref["w"]).max() <= 1e-12


class TestLocalExecutor(ExecutorContract):
    def executor(self):
        return LocalExecutor(threads=2, block_elements=300)  # units in flight, blocks small


def test_a_frankenmerge_renames_and_repeats_layers(tmp_path, family):
    """Output layer o of a slice [a, b) is layer a + o - first of its source, under the output's
    name; overlapping slices repeat layers; embeddings come from the first slice, the final norm
    and LM head from the last; config.json counts the output's layers."""
    base, fts = family(2)
    cfg = tmp_path / "franken.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(fts[0]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(fts[1]), "layer_range": [1, 2], "parameters": {"scale": 0.5}}]},
        {"sources": [{"model": str(fts[0]), "layer_range": [1, 2]}]}]}))
    merge(cfg, tmp_path / "out", progress="off")
    out, a, b = load_output(tmp_path / "out"), load_checkpoint(fts[0]), load_checkpoint(fts[1])
    q = "self_attn.q_proj.weight"
    assert np.array_equal(out[f"model.layers.0.{q}"].numpy(), a[f"model.layers.0.{q}"])
    assert np.array_equal(out[f"model.layers.1.{q}"].numpy(), a[f"model.layers.1.{q}"])
    assert np.array_equal(out[f"model.layers.2.{q}"].numpy(), (0.5 * b[f"model.layers.1.{q}"]).astype(np.float32))
    assert np.array_equal(out[f"model.layers.3.{q}"].numpy(), a[f"model.layers.1.{q}"])  # repeated
    assert np.array_equal(out["model.embed_tokens.weight"].numpy(), a["model.embed_tokens.weight"])
    assert np.array_equal(out["lm_head.weight"].numpy(), a["lm_head.weight"])
    assert len([n for n in out if n.endswith(q)]) == 4
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4


def test_a_union_vocabulary_aligns_embedding_rows_per_token(tmp_path, family):
    """A fine-tune that learnt two tokens of its own: the output vocabulary is the base's plus
    those, config.json says so, and each token's row follows the tokenizer: shared tokens are
    merged as usual, the new ones are the fine-tune's rows (mergekit's rule: a token only one
    model has takes that model's row in every model, so its merged delta is zero)."""
    from dist_svc.commands.demo import write_hf_checkpoint, write_tokenizer

    base, fts = family(2)
    tensors = {n: torch.from_numpy(a.astype(np.float32)) for n, a in load_checkpoint(fts[1]).items()}
    extra = torch.randn(2, tensors["lm_head.weight"].shape[1], generator=torch.Generator().manual_seed(0))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = torch.cat([tensors[name], extra])
    config = json.loads((base / "config.json").read_text())
    vocab = config["vocab_size"]
    write_hf_checkpoint(tmp_path / "chat", tensors, 1, {**config, "vocab_size": vocab + 2})
    write_tokenizer(tmp_path / "chat", vocab + 2, ("<|im_start|>", "<|im_end|>"))
    cfg = write_config(tmp_path / "m.yaml", base, [fts[0], tmp_path / "chat"], tokenizer_source="union",
                       calibrate=False)
    merge(cfg, tmp_path / "out", progress="off")
    out = load_output(tmp_path / "out")
    b, f0 = load_checkpoint(base), load_checkpoint(fts[0])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == vocab + 2
    tokenizer = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    ids = {a["content"]: a["id"] for a in tokenizer["added_tokens"]}
    assert ids["<|im_start|>"] == vocab and ids["<|im_end|>"] == vocab + 1
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        got = out[name].double().numpy()
        assert got.shape[0] == vocab + 2
        expected_shared = b[name] + (f0[name] - b[name]) + (tensors[name][:vocab].double().numpy() - b[name])
        assert np.abs(got[:vocab] - expected_shared).max() < 1e-6
        assert np.array_equal(got[vocab:], extra.double().numpy())


def test_every_tokenizer_file_of_the_base_is_copied_and_tokenizes_as_the_bases(tmp_path, family):
    """A base whose tokenizer is a BERT vocabulary as many checkpoints ship it (vocab.txt and its
    settings, no tokenizer.json): the output has each of its files, byte for byte, and
    transformers' AutoTokenizer loads it from the output with the base's tokens (without
    vocab.txt it loads an empty vocabulary and gives [UNK] for every word)."""
    transformers = pytest.importorskip("transformers", reason="loading the tokenizer needs transformers")
    base, fts = family(2)
    (base / "tokenizer.json").unlink()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "quick", "brown", "##s", "fox", "hello", "world"]
    (base / "vocab.txt").write_text("\n".join(words) + "\n")
    (base / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "unk_token": "[UNK]", "sep_token": "[SEP]",
        "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}))
    (base / "special_tokens_map.json").write_text(json.dumps({
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}))
    merge(write_config(tmp_path / "m.yaml", base, fts, calibrate=False), tmp_path / "out", progress="off")
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "out" / name).read_bytes() == (base / name).read_bytes(), name
    ours, theirs = (transformers.AutoTokenizer.from_pretrained(d) for d in (tmp_path / "out", base))
    text = "Hello browns fox, the world"
    assert ours.tokenize(text) == theirs.tokenize(text) == ["hello", "brown", "##s", "fox", "[UNK]", "the", "world"]
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]


def test_progress_advances_within_a_unit_block_by_block(tmp_path, family):
    """A large tensor shows progress as its blocks are done, not only when it is recorded: the
    parts add up to no more than the unit's bytes, the rest comes with the unit."""
    from dist_svc.config import load_config
    from dist_svc.driver import plan_merge
    from dist_svc.storage.output import layout_for
    from dist_svc.worker import Job

    base, fts = family(3)
    config = load_config(write_config(tmp_path / "m.yaml", base, fts))
    plan = plan_merge(config)
    layout = layout_for("safetensors", tmp_path, plan.entries(), config.output.options())
    layout.prepare({})
    units = [u for u in plan.units if u.name in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight")]
    parts: dict[str, list[int]] = {}
    done = []
    LocalExecutor(threads=1, block_elements=300).run(Job(config, layout), units, done.append,
                                                     lambda name, n: parts.setdefault(name, []).append(n))
    for unit in units:
        assert len(parts[unit.name]) >= 4, unit.name  # many blocks, each reported
        assert 0.9 * unit.nbytes <= sum(parts[unit.name]) <= unit.nbytes
    assert {r.name for r in done} == {u.name for u in units}


def test_wide_matrices_without_task_grams_take_a_second_pass_and_match_the_reference(tmp_path, family, monkeypatch):
    """Above the task Grams' size limit the row side sums ||tau_i v_r||^2 in one more pass over
    the inputs (forced here by a limit of 0): the same float64 result, in blocks."""
    import dist_svc.calibration

    monkeypatch.setattr(dist_svc.calibration, "TASK_GRAMS_BYTES", 0)
    base, fts = family(3)
    cfg = write_config(tmp_path / "m.yaml", base, fts, parameters={"lambda": 0.5}, dtype="float64")
    report = merge(cfg, tmp_path / "out", executor=LocalExecutor(block_elements=100, cache_bytes=0), progress="off")
    out = load_output(tmp_path / "out")
    ref = merge_reference(base, fts, [1.0] * 3, lam=0.5)
    for name, tensor in out.items():
        assert ulps_apart(tensor, ref[name]).max() <= 1.0, name
    wide = [n for n in report.calibration if "k_proj" in n or "down_proj" in n]
    assert wide and all(report.calibration[n]["path"] == "gram" for n in wide)
