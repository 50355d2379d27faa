"""The promises to people coming from mergekit and going to transformers, checked against the real
tools (the `compat` extra: pip install -e '.[test,compat]'; skipped, with the reason shown, without
it). mergekit 0.1.5 and dist-svc run the same YAML on the same tiny Llama-layout model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from dist_svc import merge
from dist_svc.commands.demo import TinyLlama, make_family
from tests.conftest import write_config
from tests.reference import load_checkpoint, load_output

# Real Llama dimensions in miniature (mergekit and transformers need a loadable architecture).
ARCH = TinyLlama(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    base, fts = make_family(root, k=3, arch=ARCH, dtype=torch.float32, shards=2)
    return base, fts


def _mergekit(cfg, out):
    pytest.importorskip("mergekit", reason="mergekit is not installed: pip install -e '.[test,compat]'")
    proc = subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", str(cfg), str(out), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("method, parameters, model_parameters", [
    ("task_arithmetic", {"lambda": 0.7}, [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.25}]),
    ("task_arithmetic", {"lambda": 1.0, "normalize": True}, [{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}]),
    ("ties", {"lambda": 1.0}, [{"weight": 1.0, "density": 0.5}, {"weight": 0.7, "density": 0.3},
                               {"weight": 1.0, "density": 0.8}]),
    ("ties", {"lambda": 0.9, "normalize": False}, [{"weight": 1.0, "density": 0.4}] * 3),
    # DARE's random drop cannot be matched bit for bit (mergekit draws from torch's generator,
    # dist-svc from a counter-based hash that is the same on every device and block size); with
    # density 1 nothing is dropped and the rest of DARE (sign election, weights) is compared.
    ("dare_ties", {"lambda": 1.0}, [{"weight": 1.0, "density": 1.0}, {"weight": 0.5, "density": 1.0},
                                    {"weight": 1.0, "density": 1.0}]),
    ("dare_linear", {"lambda": 0.8}, [{"weight": 1.0, "density": 1.0}] * 3),
])
def test_mergekit_and_dist_svc_agree_on_the_same_yaml(tmp_path, llama, method, parameters, model_parameters):
    base, fts = llama
    cfg = tmp_path / "mergekit.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump({
        "merge_method": method, "base_model": str(base),
        "models": [{"model": str(f), "parameters": p} for f, p in zip(fts, model_parameters)],
        "parameters": parameters, "dtype": "float32", "out_dtype": "float32",
    }, sort_keys=False))
    _mergekit(cfg, tmp_path / "mk")
    merge(cfg, tmp_path / "ds", calibrate=False, progress="off")
    ours, theirs = load_output(tmp_path / "ds"), load_output(tmp_path / "mk")
    assert set(ours) == set(theirs)
    worst = max(float((ours[n].double() - theirs[n].double()).abs().max()) for n in ours)
    # Both compute in float32; summation order differs by at most a few roundings of ~0.1 values.
    assert worst <= 1e-6, f"{method}: max abs difference {worst:.3g}"
    # And the merge did something: the result is not the base.
    base_t = load_checkpoint(base)
    assert min(float(np.abs(ours[n].double().numpy() - base_t[n]).max()) for n in ours) > 1e-4


def test_the_merged_model_loads_in_transformers_and_runs_a_forward_pass(tmp_path, llama):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: "
                                                              "pip install -e '.[test,compat]'")
    base, fts = llama
    cfg = write_config(tmp_path / "m.yaml", base, fts, parameters={"lambda": 0.5}, out_dtype="bfloat16")
    merge(cfg, tmp_path / "merged", progress="off")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert model.dtype == torch.bfloat16
    merged = load_output(tmp_path / "merged")
    state = model.state_dict()
    for name, tensor in merged.items():  # what transformers loaded is what dist-svc wrote
        assert torch.equal(state[name], tensor), name
    ids = tokenizer("w3 w17 w42", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[3, 17, 42]]  # the base's tokenizer, carried over
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], ARCH.vocab_size) and torch.isfinite(logits).all()


def test_gradients_and_filters_mean_what_they_mean_in_mergekit(tmp_path, llama):
    """Layer gradients (a list interpolated from the first layer to the last) and per-tensor
    filters, in the global parameters and per model, with the fall-through of a filtered list
    that has no entry for a tensor: mergekit's own result, within float32 rounding."""
    import yaml

    base, fts = llama
    cfg = tmp_path / "mergekit.yaml"
    cfg.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(base),
        "models": [
            {"model": str(fts[0]), "parameters": {"weight": [0.2, 1.0], "density": 0.6}},
            {"model": str(fts[1]), "parameters": {"weight": [{"filter": "self_attn", "value": 0.4},
                                                              {"filter": "mlp", "value": [1.0, 0.3]}]}},
            {"model": str(fts[2]), "parameters": {"density": [{"filter": "down_proj", "value": 0.3}]}},
        ],
        "parameters": {"weight": 0.8, "density": [0.9, 0.5], "lambda": [{"filter": "norm", "value": 0.5},
                                                                          {"value": 1.0}]},
        "dtype": "float32", "out_dtype": "float32",
    }, sort_keys=False))
    _mergekit(cfg, tmp_path / "mk")
    merge(cfg, tmp_path / "ds", calibrate=False, progress="off")
    ours, theirs = load_output(tmp_path / "ds"), load_output(tmp_path / "mk")
    worst = max(float((ours[n].double() - theirs[n].double()).abs().max()) for n in ours)
    assert worst <= 1e-6, f"max abs difference {worst:.3g}"


def test_a_gradient_is_interpolated_over_the_layers():
    from dist_svc.config import layer_position, resolve

    assert [layer_position(f"model.layers.{i}.mlp.up_proj.weight", 5) for i in range(5)] == [0, .25, .5, .75, 1]
    assert layer_position("model.embed_tokens.weight", 5) == 0 and layer_position("lm_head.weight", 5) == 0
    assert resolve([0.0, 1.0, 3.0], "x", 0.75) == pytest.approx(2.0)
    assert resolve([{"filter": "attn", "value": 2.0}], "mlp.w", 0.5) is None  # falls through
    assert resolve([{"filter": "attn", "value": 2.0}, {"filter": None, "value": [0.0, 4.0]}], "mlp", .5) == 2.0
