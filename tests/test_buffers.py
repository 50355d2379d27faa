"""Non-float tensors (integer and bool buffers: position ids, attention masks, batch-norm
counters) as checkpoints carry them: copied byte for byte from the base (else the first model),
never merged or calibrated; refused, in one paragraph naming the tensor and the models, only
when the inputs disagree on one. `convert` keeps them, and `verify`, a rerun and the checksums
cover them like every other tensor. Compared with mergekit 0.1.5 on a BERT-layout model (whose
architecture mergekit knows, `embeddings.position_ids` included), which transformers then loads.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from dist_svc import merge
from dist_svc.commands.convert import convert
from dist_svc.commands.demo import write_hf_checkpoint
from dist_svc.errors import DistSvcError
from dist_svc.storage.zarr_reader import ZarrCheckpoint
from tests.conftest import file_bytes, run_cli, stored_at, write_config
from tests.reference import load_output

POSITIONS = 64
BERT_IDS = "bert.embeddings.position_ids"


def buffers(layers: int = 2) -> dict[str, torch.Tensor]:
    """What downloaded checkpoints carry besides weights: int64 position ids, a bool and a uint8
    causal mask per layer, a 0-d int64 counter, an int32 table."""
    causal = torch.tril(torch.ones(8, 8, dtype=torch.bool)).view(1, 1, 8, 8)
    out = {"model.position_ids": torch.arange(POSITIONS, dtype=torch.int64).view(1, POSITIONS),
           "model.norm.num_batches_tracked": torch.tensor(0, dtype=torch.int64),  # zeros: every chunk still written
           "model.rope_table": torch.arange(-6, 6, dtype=torch.int32).view(3, 4)}
    for n in range(layers):
        out[f"model.layers.{n}.self_attn.causal_mask"] = causal.clone()
        out[f"model.layers.{n}.self_attn.bias_mask"] = causal.to(torch.uint8) * 3
    return out


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def with_tensors(src: Path, dst: Path, add: dict[str, torch.Tensor] | None = None, drop: tuple[str, ...] = (),
                 shards: int = 1) -> Path:
    """A copy of checkpoint `src` with tensors added (or replaced) and dropped, side files kept."""
    tensors = {n: t for n, t in checkpoint_tensors(src).items() if n not in drop}
    tensors.update(add or {})
    write_hf_checkpoint(dst, tensors, shards)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and not f.name.endswith(".index.json"):
            shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture
def buffered(family, tmp_path):
    """A tiny Llama family whose every model carries the same buffers (the base in 3 shards)."""
    base, fts = family(k=2)
    root = tmp_path / "buffered"
    return (with_tensors(base, root / "base", buffers(), shards=3),
            [with_tensors(ft, root / ft.name, buffers()) for ft in fts], base, fts)


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_buffers_are_copied_from_the_base_byte_for_byte_and_floats_merge_as_without_them(tmp_path, buffered):
    base, fts, plain_base, plain_fts = buffered
    report = merge(write_config(tmp_path / "b.yaml", base, fts, out_dtype="bfloat16"), tmp_path / "out",
                   progress="off")
    merge(write_config(tmp_path / "p.yaml", plain_base, plain_fts, out_dtype="bfloat16"), tmp_path / "plain",
          progress="off")
    ours, plain = load_output(tmp_path / "out"), load_output(tmp_path / "plain")
    for name, t in buffers().items():  # the base's dtype, shape and bytes, whatever out_dtype says
        assert ours[name].dtype == t.dtype and ours[name].shape == t.shape and bits(ours[name]) == bits(t), name
    assert set(ours) == set(plain) | set(buffers())
    for name, t in plain.items():  # merged and calibrated exactly as they are without buffers
        assert ours[name].dtype == torch.bfloat16 and bits(ours[name]) == bits(t), name
    assert f"{len(buffers())} non-float copied" in report.plan_summary, report.plan_summary
    # the manifest records them as copied, never calibrated
    manifest = json.loads((tmp_path / "out" / "dist-svc-manifest.json").read_text())
    for name in buffers():
        unit = manifest["units"][name]
        assert unit["calibrate"] is False and manifest["merged_with"][unit["merged_with"]]["copied"] is True
    # verify re-reads them against their checksums; a rerun finds the output complete
    proc = run_cli("verify", tmp_path / "out")
    assert "verified" in proc.stdout
    assert merge(tmp_path / "b.yaml", tmp_path / "out", progress="off").already_complete
    # a changed byte of a buffer is found like any other
    shard, offset = _stored(tmp_path / "out", "model.position_ids")
    data = bytearray(shard.read_bytes())
    data[offset + 8] ^= 1
    shard.write_bytes(bytes(data))
    proc = run_cli("verify", tmp_path / "out", check=False)
    assert proc.returncode != 0 and "model.position_ids" in proc.stdout + proc.stderr


def test_a_lost_shard_holding_buffers_is_merged_again_alone_to_the_same_bytes(tmp_path, buffered):
    base, fts, _, _ = buffered
    cfg = write_config(tmp_path / "b.yaml", base, fts)
    out = tmp_path / "out"
    run_cli("merge", cfg, out, "--shard-size", "8KB")
    good = file_bytes(out)
    shard, _, _, in_shard = stored_at(out, "model.position_ids")
    shard.unlink()
    status = run_cli("status", out).stdout
    assert "complete" not in status or "damaged" in status, status
    rerun = run_cli("merge", cfg, out, "--shard-size", "8KB")
    assert f"merged {len(in_shard)} tensors" in rerun.stdout, rerun.stdout
    assert file_bytes(out) == good
    assert "verified" in run_cli("verify", out).stdout
    assert bits(load_output(out)["model.position_ids"]) == bits(buffers()["model.position_ids"])


def _stored(out: Path, name: str) -> tuple[Path, int]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = out / index["weight_map"][name]
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return shard, 8 + n + json.loads(raw[8:8 + n])[name]["data_offsets"][0]


def test_the_dry_run_counts_buffers_as_copied(tmp_path, buffered):
    base, fts, _, _ = buffered
    proc = run_cli("merge", write_config(tmp_path / "b.yaml", base, fts), tmp_path / "out", "--dry-run")
    assert f"{len(buffers())} non-float copied" in proc.stdout, proc.stdout
    assert not (tmp_path / "out").exists()


def test_a_fine_tune_without_a_buffer_gets_the_bases(tmp_path, buffered):
    base, fts, _, _ = buffered
    lacking = with_tensors(fts[1], tmp_path / "lacking",
                           drop=("model.position_ids", "model.layers.1.self_attn.causal_mask"))
    merge(write_config(tmp_path / "b.yaml", base, [fts[0], lacking]), tmp_path / "out", progress="off")
    ours = load_output(tmp_path / "out")
    for name, t in buffers().items():
        assert ours[name].dtype == t.dtype and bits(ours[name]) == bits(t), name


def test_a_buffer_only_a_fine_tune_holds_is_left_out_as_the_base_lacks_it(tmp_path, buffered):
    _, _, plain_base, plain_fts = buffered
    extra = with_tensors(plain_fts[1], tmp_path / "extra", buffers())
    merge(write_config(tmp_path / "b.yaml", plain_base, [plain_fts[0], extra]), tmp_path / "out", progress="off")
    assert set(load_output(tmp_path / "out")) == set(checkpoint_tensors(plain_base))
    float_extra = with_tensors(plain_fts[1], tmp_path / "float-extra", {"model.extra.weight": torch.ones(3)})
    with pytest.raises(DistSvcError, match="model.extra.weight"):  # a float the base lacks is still refused
        merge(write_config(tmp_path / "f.yaml", plain_base, [float_extra]), tmp_path / "out2", progress="off")


def test_without_a_base_the_first_model_gives_the_buffers(tmp_path, buffered):
    _, fts, _, _ = buffered
    cfg = tmp_path / "linear.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(f), "parameters": {"weight": 1.0}} for f in fts]}))
    merge(cfg, tmp_path / "out", progress="off")
    ours = load_output(tmp_path / "out")
    for name, t in buffers().items():
        assert ours[name].dtype == t.dtype and bits(ours[name]) == bits(t), name


@pytest.mark.parametrize("change", ["value", "dtype", "shape", "float"])
def test_inputs_that_disagree_on_a_buffer_are_refused_naming_it_and_nothing_is_written(tmp_path, buffered, change):
    base, fts, _, _ = buffered
    ids = buffers()["model.position_ids"]
    other = {"value": ids.clone().index_fill_(1, torch.tensor([40]), 7), "dtype": ids.to(torch.int32),
             "shape": ids[:, :32].clone(), "float": ids.to(torch.float32)}[change]
    odd = with_tensors(fts[1], tmp_path / "odd", {"model.position_ids": other})
    proc = run_cli("merge", write_config(tmp_path / "b.yaml", base, [fts[0], odd]), tmp_path / "out", check=False)
    message = proc.stderr.strip()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "model.position_ids" in message and str(base) in message and str(odd) in message, message
    assert "\n\n" not in message and len(message.splitlines()) <= 3, message
    assert not (tmp_path / "out").exists()


def test_convert_keeps_buffers_both_ways_and_zarr_stores_their_dtypes(tmp_path, buffered):
    base, _, _, _ = buffered
    convert(base, tmp_path / "b.zarr", progress="off")
    convert(tmp_path / "b.zarr", tmp_path / "back", progress="off")
    store = ZarrCheckpoint(tmp_path / "b.zarr")
    back = checkpoint_tensors(tmp_path / "back")
    for name, t in buffers().items():
        meta = json.loads((tmp_path / "b.zarr" / name / "zarr.json").read_text())
        assert meta["data_type"] == str(t.dtype).removeprefix("torch."), name  # natively
        assert store.read(name).dtype == t.dtype and bits(store.read(name)) == bits(t), name
        assert back[name].dtype == t.dtype and bits(back[name]) == bits(t), name
    assert checkpoint_tensors(base).keys() == back.keys()
    for name, t in checkpoint_tensors(base).items():
        assert bits(back[name]) == bits(t), name


def test_a_merge_of_zarr_inputs_into_a_zarr_store_copies_buffers_and_verifies(tmp_path, buffered):
    base, fts, _, _ = buffered
    zbase = tmp_path / "base.zarr"
    convert(base, zbase, progress="off")
    merge(write_config(tmp_path / "z.yaml", zbase, fts), tmp_path / "out.zarr", progress="off")
    store = ZarrCheckpoint(tmp_path / "out.zarr")
    for name, t in buffers().items():
        assert store.read(name).dtype == t.dtype and bits(store.read(name)) == bits(t), name
    assert "verified" in run_cli("verify", tmp_path / "out.zarr").stdout


def test_a_pytorch_bin_with_integer_buffers_converts_and_merges(tmp_path, buffered):
    base, fts, _, _ = buffered
    binary = tmp_path / "bin-base"
    binary.mkdir()
    torch.save(checkpoint_tensors(base), binary / "pytorch_model.bin")
    shutil.copy(base / "config.json", binary / "config.json")
    convert(binary, tmp_path / "from-bin", progress="off")
    back = checkpoint_tensors(tmp_path / "from-bin")
    for name, t in buffers().items():
        assert back[name].dtype == t.dtype and bits(back[name]) == bits(t), name
    merge(write_config(tmp_path / "b.yaml", binary, fts), tmp_path / "out", progress="off")
    assert bits(load_output(tmp_path / "out")["model.position_ids"]) == bits(buffers()["model.position_ids"])


def test_a_frankenmerge_copies_each_layers_buffers_from_its_slice(tmp_path, buffered):
    base, fts, _, _ = buffered
    masks = {n: buffers()[n].clone() for n in buffers() if "layers" in n}
    masks["model.layers.1.self_attn.bias_mask"][0, 0, 7, 0] = 9  # ft-2's layer 1 has its own
    ft2 = with_tensors(fts[1], tmp_path / "ft-2b", masks)
    cfg = tmp_path / "frank.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(base), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(ft2), "layer_range": [1, 2]}]}]}))
    merge(cfg, tmp_path / "out", progress="off")
    ours = load_output(tmp_path / "out")
    assert bits(ours["model.layers.2.self_attn.bias_mask"]) == bits(masks["model.layers.1.self_attn.bias_mask"])
    assert bits(ours["model.layers.1.self_attn.bias_mask"]) == bits(buffers()["model.layers.1.self_attn.bias_mask"])
    assert ours["model.layers.2.self_attn.causal_mask"].dtype == torch.bool


# -- against mergekit and transformers: a BERT checkpoint as downloaded ------------------------------

def _bert_family(root: Path, k: int = 2) -> tuple[Path, list[Path]]:
    """A tiny BERT classifier saved by transformers, with the int64 `bert.embeddings.position_ids`
    that checkpoints saved by older transformers (all-MiniLM-L6-v2 as shipped) carry, and k
    fine-tunes: its weights perturbed, the same buffer. (mergekit 0.1.5 knows this layout's
    position ids; its BertModel layout fails on any optional weight with aliases.)"""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=POSITIONS)
    model = transformers.BertForSequenceClassification(config)
    paths = []
    for i in range(k + 1):
        out = root / ("base" if i == 0 else f"ft-{i}")
        model.save_pretrained(out, safe_serialization=True)
        tensors = load_file(str(out / "model.safetensors"))
        gen = torch.Generator().manual_seed(i)
        if i:
            tensors = {n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in tensors.items()}
        tensors[BERT_IDS] = torch.arange(POSITIONS, dtype=torch.int64).view(1, POSITIONS)
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        paths.append(out)
    return paths[0], paths[1:]


def _mergekit(cfg: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", str(cfg), str(out), "--quiet"],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_a_bert_checkpoint_with_position_ids_merges_as_mergekit_and_loads_in_transformers(tmp_path, method):
    pytest.importorskip("mergekit", reason="mergekit is not installed: pip install -e '.[test,compat]'")
    transformers = pytest.importorskip("transformers")
    base, fts = _bert_family(tmp_path)
    cfg = tmp_path / f"{method}.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(base), "dtype": "float32", "models": [
        {"model": str(f), "parameters": {"weight": 0.7, "density": 0.5}} for f in fts]}))
    proc = _mergekit(cfg, tmp_path / "mk")
    assert proc.returncode == 0, proc.stderr[-3000:]
    merge(cfg, tmp_path / "ds", calibrate=False, progress="off")
    ours, theirs = load_output(tmp_path / "ds"), load_output(tmp_path / "mk")
    assert set(ours) == set(theirs)
    ids = ours[BERT_IDS]
    assert ids.dtype == theirs[BERT_IDS].dtype == torch.int64
    assert torch.equal(ids, theirs[BERT_IDS])
    for name in ours:
        assert float((ours[name].double() - theirs[name].double()).abs().max()) <= 1e-6, name
    # calibrated too: the buffer is still the base's
    merge(cfg, tmp_path / "cal", calibrate=True, progress="off")
    assert bits(load_output(tmp_path / "cal")[BERT_IDS]) == bits(ids)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "cal")
    state = model.state_dict()
    merged = load_output(tmp_path / "cal")
    assert set(merged) - set(state) == {BERT_IDS}  # a buffer transformers rebuilds (not persistent)
    for name, t in merged.items():
        if name in state:
            assert torch.equal(state[name], t), name
    assert torch.equal(model.bert.embeddings.position_ids, ids)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()
    assert "verified" in run_cli("verify", tmp_path / "cal").stdout


def test_mergekit_and_dist_svc_both_refuse_a_position_ids_the_models_disagree_on(tmp_path):
    pytest.importorskip("mergekit", reason="mergekit is not installed: pip install -e '.[test,compat]'")
    base, fts = _bert_family(tmp_path)
    tensors = load_file(str(fts[1] / "model.safetensors"))
    tensors[BERT_IDS] = tensors[BERT_IDS].flip(1).contiguous()
    save_file(tensors, str(fts[1] / "model.safetensors"), metadata={"format": "pt"})
    cfg = write_config(tmp_path / "c.yaml", base, fts, dtype="float32")
    proc = _mergekit(cfg, tmp_path / "mk")
    assert proc.returncode != 0 and BERT_IDS in proc.stderr
    with pytest.raises(DistSvcError, match=BERT_IDS):
        merge(cfg, tmp_path / "ds", progress="off")
    assert not (tmp_path / "ds").exists()


def test_a_lora_adapter_of_a_base_with_buffers_merges_dense_and_as_an_adapter(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    tensors = load_file(str(tmp_path / "base" / "model.safetensors"))
    save_file({**tensors, **buffers()}, str(tmp_path / "base" / "model.safetensors"), metadata={"format": "pt"})
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
    wrapped.save_pretrained(tmp_path / "adapter")
    base = tmp_path / "base"
    merge(write_config(tmp_path / "d.yaml", base, [tmp_path / "adapter"]), tmp_path / "dense", progress="off")
    ours = load_output(tmp_path / "dense")
    for name, t in buffers().items():
        assert ours[name].dtype == t.dtype and bits(ours[name]) == bits(t), name
    merge(write_config(tmp_path / "p.yaml", base, [tmp_path / "adapter"], output={"format": "peft"}),
          tmp_path / "as-adapter", progress="off")
    saved = load_file(str(tmp_path / "as-adapter" / "adapter_model.safetensors"))
    assert saved and not set(saved) & set(buffers())  # an adapter changes no buffer: the base's stay
