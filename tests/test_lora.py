"""LoRA adapters made by PEFT itself, on a tiny Llama made by transformers: the adapted weights
against PEFT's own `merge_and_unload`, merges of adapters against a float64 reference, and the
factored SVC (output as one PEFT adapter) against `svc_reference` and against PEFT loading it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dist_svc import merge
from dist_svc.lowrank import Factored, merge_factored
from dist_svc.storage import open_checkpoint
from tests.conftest import write_config
from tests.reference import svc_reference

transformers = pytest.importorskip("transformers", reason="the LoRA tests build models with transformers (.[compat])")
peft = pytest.importorskip("peft", reason="the LoRA tests build adapters with PEFT (.[compat])")

# Each adapter exercises something: rsLoRA, a rank pattern, an embedding LoRA (PEFT saves the
# embedding's base layer too), modules_to_save, fan-in/fan-out-free Linear layers of every shape.
ADAPTERS = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "up_proj"], use_rslora=True,
         rank_pattern={"up_proj": 3}, alpha_pattern={"k_proj": 1.0}),
    dict(r=3, lora_alpha=3, target_modules=["q_proj", "o_proj", "embed_tokens"], modules_to_save=["lm_head"]),
]


def _config():
    return transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def peft_family(tmp_path_factory):
    """A base saved by transformers, three adapters trained-looking (random, non-zero B) saved by
    PEFT, and each adapter's weights as PEFT's merge_and_unload gives them."""
    root = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    base_model = transformers.LlamaForCausalLM(_config())
    base_model.save_pretrained(root / "base", safe_serialization=True)
    base_state = {k: v.clone() for k, v in base_model.state_dict().items()}
    adapters, merged = [], []
    for i, options in enumerate(ADAPTERS):
        torch.manual_seed(10 + i)
        model = transformers.LlamaForCausalLM(_config())
        model.load_state_dict(base_state)
        wrapped = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **options))
        if "modules_to_save" in options:  # a trained head differs from the base's
            with torch.no_grad():
                for name, p in wrapped.named_parameters():
                    if "modules_to_save" in name:
                        p.add_(0.01 * torch.randn_like(p))
        wrapped.save_pretrained(root / f"adapter-{i + 1}")
        merged.append({k: v.detach().clone() for k, v in wrapped.merge_and_unload().state_dict().items()})
        adapters.append(root / f"adapter-{i + 1}")
    return root / "base", adapters, base_state, merged


def reference_delta(adapter_dir, base_state) -> dict[str, np.ndarray]:
    """Each tensor's change by an adapter, in float64, from PEFT's files and PEFT's documented
    rules (scale = alpha / r, alpha / sqrt(r) with rsLoRA; patterns by module suffix;
    embeddings transposed; full tensors replace)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights = {k.removeprefix("base_model.model."): v.double().numpy()
               for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items()}
    out = {}
    for key, value in weights.items():
        if key.endswith((".lora_A.weight", ".lora_embedding_A")):
            module = key.rsplit(".lora_", 1)[0]
            embedding = "embedding" in key
            a = value
            b = weights[f"{module}.lora_embedding_B" if embedding else f"{module}.lora_B.weight"]
            leaf = module.rsplit(".", 1)[-1]
            r = config["rank_pattern"].get(leaf, config["r"])
            alpha = config["alpha_pattern"].get(leaf, config["lora_alpha"])
            scale = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
            delta = scale * (b @ a)
            out[f"{module}.weight"] = out.get(f"{module}.weight", 0) + (delta.T if embedding else delta)
        elif ".lora_" not in key:
            name = key.replace(".base_layer.weight", ".weight")
            out[name] = out.get(name, 0) + value - base_state[name].double().numpy()
    return out


def test_adapted_weights_are_the_float64_reference_rounded_once_and_match_peft_merge_and_unload(peft_family):
    base, adapters, base_state, peft_merged = peft_family
    base_ckpt = open_checkpoint(base)
    for adapter, theirs in zip(adapters, peft_merged):
        ckpt = open_checkpoint(adapter, base=base_ckpt)
        delta = reference_delta(adapter, base_state)
        assert set(delta) <= set(ckpt.tensors)
        for name in ckpt.tensors:
            exact = base_state[name].double().numpy() + delta.get(name, 0)
            ours = ckpt.read(name)
            # one rounding of the exact float64 value: equal to numpy's rounding of it
            assert np.array_equal(ours.numpy(), exact.astype(np.float32)), (adapter.name, name)
            # PEFT computes in float32 (B @ A, then adds): within a few float32 ulps of the same value
            np.testing.assert_allclose(ours.numpy(), theirs[name].numpy(), rtol=1e-6, atol=2e-7,
                                       err_msg=f"{adapter.name} {name}")
            # block reads of the exact change (what the worker merges) agree with it too
            change = ckpt.delta(name, slice(1, 5), None, torch.float64) if len(ckpt.tensors[name].shape) else None
            if change is not None:
                np.testing.assert_allclose(change.numpy(), np.broadcast_to(delta.get(name, 0), exact.shape)[1:5],
                                           rtol=1e-12, atol=1e-15)


def test_rank_and_alpha_patterns_are_matched_as_peft_matches_them(tmp_path, peft_family):
    """Pattern keys are regular expressions matched against the end of a module's name, the first
    in the file's order winning (PEFT saves them sorted): the adapter as PEFT loads and merges it
    is dist-svc's adapted model."""
    base, _, base_state, _ = peft_family
    model = transformers.LlamaForCausalLM(_config())
    model.load_state_dict(base_state)
    torch.manual_seed(5)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(
        init_lora_weights=False, r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
        rank_pattern={"model.layers.0.self_attn.q_proj": 5, r"layers\.\d+\.mlp\.down_proj": 6, "q_proj": 3},
        alpha_pattern={"^model.layers.1.*v_proj": 7, "k_proj": 2.5}))
    wrapped.save_pretrained(tmp_path / "adapter")
    fresh = transformers.LlamaForCausalLM(_config())
    fresh.load_state_dict(base_state)
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").merge_and_unload().state_dict()
    ranks = {k.split(".lora_A")[0].removeprefix("base_model.model."): v.shape[0]
             for k, v in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).items() if ".lora_A" in k}
    assert ranks["model.layers.0.self_attn.q_proj"] == 5 and ranks["model.layers.1.self_attn.q_proj"] == 3
    assert ranks["model.layers.1.mlp.down_proj"] == 6 and ranks["model.layers.1.self_attn.v_proj"] == 2
    ckpt = open_checkpoint(tmp_path / "adapter", base=open_checkpoint(base))
    assert ckpt.factors["model.layers.1.self_attn.v_proj.weight"].scale == 7 / 2
    assert ckpt.factors["model.layers.0.self_attn.v_proj.weight"].scale == 4 / 2
    assert ckpt.factors["model.layers.0.self_attn.k_proj.weight"].scale == 2.5 / 2
    for name in ckpt.tensors:
        np.testing.assert_allclose(ckpt.read(name).numpy(), theirs[name].detach().numpy(), rtol=1e-6, atol=2e-7,
                                   err_msg=name)


def _reference_merge(base_state, adapters, lam: float, alpha: float, skip=("*embed*", "*lm_head*")):
    import fnmatch

    deltas = [reference_delta(a, base_state) for a in adapters]
    out = {}
    for name, t in base_state.items():
        taus = [np.broadcast_to(d.get(name, 0.0), t.shape).astype(np.float64) for d in deltas]
        merged = lam * np.sum(taus, axis=0)
        if t.ndim == 2 and not any(fnmatch.fnmatchcase(name, p) for p in skip):
            merged = svc_reference(merged, taus, alpha)
        out[name] = t.double().numpy() + merged
    return out


def test_a_calibrated_merge_of_peft_adapters_matches_the_float64_reference(tmp_path, peft_family):
    """Task vectors scale * B @ A computed block by block (rows of B times A) and merged as any
    others: within float32 rounding of the float64 reference (the workers compute in float32;
    the task vectors are rounded once from exact float64 products)."""
    base, adapters, base_state, _ = peft_family
    cfg = write_config(tmp_path / "m.yaml", base, adapters, parameters={"lambda": 0.7})
    merge(cfg, tmp_path / "out", progress="off")
    ours = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        ours.update(load_file(str(f)))
    reference = _reference_merge(base_state, adapters, 0.7, 1 / 3)
    for name, ref in reference.items():
        np.testing.assert_allclose(ours[name].double().numpy(), ref, rtol=1e-5, atol=1e-6, err_msg=name)


def test_factored_svc_equals_the_dense_float64_reference():
    gen = torch.Generator().manual_seed(5)
    m, n = 300, 200
    shared = torch.randn(m, 3, generator=gen, dtype=torch.float64)
    taus = []
    for rank in (4, 6, 2):
        left = torch.cat([shared[:, :2], torch.randn(m, rank - 2, generator=gen, dtype=torch.float64)], dim=1)
        taus.append(Factored(left, torch.randn(n, rank, generator=gen, dtype=torch.float64)))
    coefficients = [0.5, 1.0, -0.3]
    for side in ("column", "row"):
        result, summary = merge_factored(taus, coefficients, True, alpha=1 / 3, side=side)
        assert result.left.shape == (m, 12) and result.right.shape == (n, 12)  # rank <= sum r_i
        merged = sum(c * t.dense() for c, t in zip(coefficients, taus))
        reference = svc_reference(merged.numpy(), [t.dense().numpy() for t in taus], 1 / 3, side)
        # Both are float64 computations of the same definition: agreement to ~1e-13 relative.
        error = np.linalg.norm(result.dense().numpy() - reference) / np.linalg.norm(reference)
        assert error < 1e-11, (side, error)
        assert summary["rank"] <= 12


def test_adapters_merged_as_one_peft_adapter_load_in_peft_and_equal_the_reference(tmp_path, peft_family):
    base, adapters, base_state, _ = peft_family
    cfg = write_config(tmp_path / "m.yaml", base, adapters, parameters={"lambda": 0.7}, output={"format": "peft"})
    report = merge(cfg, tmp_path / "adapter", progress="off")
    assert not report.already_complete and report.calibration
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] <= 4 + 3 + 3 and config["modules_to_save"] == ["lm_head"]
    # PEFT loads it onto the base and merges it: the result is the dense calibrated merge.
    model = transformers.LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").merge_and_unload()
    state = {k: v.double().numpy() for k, v in loaded.state_dict().items()}
    reference = _reference_merge(base_state, adapters, 0.7, 1 / 3)
    for name, ref in reference.items():
        np.testing.assert_allclose(state[name], ref, rtol=1e-5, atol=1e-6, err_msg=name)
    # A rerun finds it finished; another config is refused, nothing overwritten.
    again = merge(cfg, tmp_path / "adapter", progress="off")
    assert again.already_complete
    from dist_svc import DistSvcError

    other = write_config(tmp_path / "o.yaml", base, adapters, parameters={"lambda": 0.5}, output={"format": "peft"})
    with pytest.raises(DistSvcError, match="already exists"):
        merge(other, tmp_path / "adapter", progress="off")
