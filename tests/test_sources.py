"""Checkpoint sources beyond local safetensors and zarr: how a config's model string becomes a
source, legacy `.bin`/`.pt` state dicts (never executing a pickle), PEFT LoRA adapters as
models, and Hugging Face Hub IDs read from a real cache layout with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import pickletools
import random
import re
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_svc import DistSvcError
from dist_svc.commands.convert import convert
from dist_svc.commands.demo import write_hf_checkpoint
from dist_svc.storage import open_checkpoint, source_of
from dist_svc.storage.peft_patterns import compile_key, matches
from tests.conftest import file_bytes, run_cli, write_config
from tests.contracts import CheckpointContract, _bits, tensors_of_every_shape


# -- the edge: what a config string names -----------------------------------------------------------

def test_a_config_string_becomes_a_local_path_or_stays_a_url_hub_id_or_adapter_pair(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert source_of("org/local") == tmp_path / "org" / "local"  # a local directory wins over a Hub ID
    assert source_of("./ft") == tmp_path / "ft"
    assert source_of("meta-llama/Llama-3.1-8B") == "hf://meta-llama/Llama-3.1-8B"
    assert source_of("meta-llama/Llama-3.1-8B@v1.0") == "hf://meta-llama/Llama-3.1-8B@v1.0"
    assert source_of("hf://org/name@main") == "hf://org/name@main"
    assert source_of("s3://bucket/models/ft-1/") == "s3://bucket/models/ft-1"
    assert source_of("gs://bucket/m.zarr") == "gs://bucket/m.zarr"
    (tmp_path / "adapters" / "a1").mkdir(parents=True)
    assert source_of("base+adapters/a1") == f"{tmp_path / 'base'}+{tmp_path / 'adapters' / 'a1'}"
    assert source_of("base+peft/lora") == f"{tmp_path / 'base'}+hf://peft/lora"  # not here: a Hub adapter
    assert source_of("org/model+s3://b/lora") == "hf://org/model+s3://b/lora"


def test_a_url_in_a_config_is_not_turned_into_a_local_directory(tmp_path):
    from dist_svc.config import parse_config

    cfg = parse_config({"merge_method": "task_arithmetic", "base_model": "s3://bucket/base",
                        "models": [{"model": "s3://bucket/ft"}, {"model": "org/ft@v2"}]})
    assert cfg.base_model == "s3://bucket/base"
    assert cfg.checkpoints == ("s3://bucket/base", "s3://bucket/ft", "hf://org/ft@v2")
    assert cfg.fingerprint_dict()["sources"]["models[0]"]["model"] == "s3://bucket/ft"


# -- legacy .bin / .pt -------------------------------------------------------------------------------

class TestTorchCheckpoint(CheckpointContract):
    def make(self, tmp_path, tensors, side_files):
        d = tmp_path / "bin"
        d.mkdir()
        torch.save(tensors, d / "pytorch_model.bin")
        for name, data in side_files.items():
            (d / name).write_bytes(data)
        return open_checkpoint(d)


def test_a_sharded_bin_checkpoint_reads_as_its_safetensors_twin(tmp_path):
    tensors = tensors_of_every_shape(torch.bfloat16)
    names = list(tensors)
    d = tmp_path / "sharded"
    d.mkdir()
    weight_map = {}
    for k, part in enumerate((names[:2], names[2:])):
        fname = f"pytorch_model-{k + 1:05d}-of-00002.bin"
        torch.save({n: tensors[n] for n in part}, d / fname)
        weight_map.update({n: fname for n in part})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ckpt = open_checkpoint(d)
    assert [ckpt.tensors[n].where.rsplit("/", 1)[1] for n in names] == [weight_map[n] for n in names]
    for name, t in tensors.items():
        assert _bits(ckpt.read(name)) == _bits(t), name
    convert(d, tmp_path / "st", progress="off")
    back = _load_dir(tmp_path / "st")
    assert all(torch.equal(back[n], t) for n, t in tensors.items())


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


class _Runs:
    """A pickle that runs a shell command when loaded: what a hostile checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_by_name_and_never_run(tmp_path, family):
    base, fts = family(1)
    bad = tmp_path / "bad"
    bad.mkdir()
    marker = tmp_path / "pwned"
    state = {k: v for k, v in load_file(str(fts[0] / "model.safetensors")).items()}
    torch.save({**state, "payload": _Runs(marker)}, bad / "pytorch_model.bin")
    result = run_cli("merge", write_config(tmp_path / "m.yaml", base, [bad]), tmp_path / "out", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert str(bad / "pytorch_model.bin") in result.stderr and "needs code" in result.stderr
    assert "system" in result.stderr and "dist-svc convert" in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_convert_with_trust_pickle_reads_a_training_checkpoint_that_needs_a_class(tmp_path):
    tensors = {"w": torch.randn(5, 3), "b": torch.randn(3)}
    src = tmp_path / "train"
    src.mkdir()
    torch.save({"state_dict": tensors, "args": argparse.Namespace(lr=0.1)}, src / "checkpoint.pt")
    with pytest.raises(DistSvcError, match="needs code.*argparse.Namespace"):
        open_checkpoint(src)
    result = run_cli("convert", src, tmp_path / "st", "--trust-pickle")
    assert "verified" in result.stdout
    back = _load_dir(tmp_path / "st")
    assert set(back) == {"w", "b"} and all(torch.equal(back[n], t) for n, t in tensors.items())


def test_a_bin_fine_tune_merges_to_the_bytes_of_its_safetensors_twin(tmp_path, family):
    base, fts = family(2)
    as_bin = tmp_path / "ft-1-bin"
    as_bin.mkdir()
    torch.save(load_file(str(fts[0] / "model.safetensors")), as_bin / "pytorch_model.bin")
    run_cli("merge", write_config(tmp_path / "a.yaml", base, fts), tmp_path / "a", "--shard-size", "40KB")
    run_cli("merge", write_config(tmp_path / "b.yaml", base, [as_bin, fts[1]]), tmp_path / "b", "--shard-size", "40KB")
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")


def _rewrite_zip(path: Path, edit) -> None:
    """The torch.save archive at `path` again, each member's bytes through edit(name, data)."""
    with zipfile.ZipFile(path) as z:
        members = [(info, edit(info.filename, z.read(info.filename))) for info in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info, data in members:
            z.writestr(info, data)


def _declared_numel(pkl: bytes, key: str, numel: int) -> bytes:
    """The pickle with storage `key` declared `numel` elements long (the int after its key and location)."""
    ops = list(pickletools.genops(pkl))
    at = next(i for i, (op, arg, _) in enumerate(ops) if arg == key and ops[i + 2][1] == "cpu")
    i = next(j for j in range(at, len(ops)) if ops[j][0].name in ("BININT1", "BININT2", "BININT"))
    return pkl[: ops[i][2]] + b"J" + struct.pack("<i", numel) + pkl[ops[i + 1][2]:]


@pytest.mark.parametrize("damage", ["record cut short", "view past its storage"])
def test_a_bin_whose_stored_data_is_shorter_than_a_tensor_is_refused_by_file_and_tensor(tmp_path, family, damage):
    """A mapped torch.load trusts the length the pickle declares: a storage record cut short would
    fill the tensor with the bytes that follow it in the file (5.97e20 where 0.02 was saved)."""
    base, fts = family(1)
    state = load_file(str(fts[0] / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    t = state.pop(name)
    bad = tmp_path / "bad"
    bad.mkdir()
    if damage == "record cut short":  # storage 0 is the first tensor's; half of its bytes are gone
        torch.save({name: t, **state}, bad / "pytorch_model.bin")
        _rewrite_zip(bad / "pytorch_model.bin", lambda n, d: d[: len(d) // 2] if n.endswith("/data/0") else d)
    else:  # a view 8 elements into its storage, which is declared (and stored) 8 elements too short
        buffer = torch.cat([torch.zeros(8), t.flatten()])
        torch.save({name: buffer[8:].view(t.shape), **state}, bad / "pytorch_model.bin")
        _rewrite_zip(bad / "pytorch_model.bin", lambda n, d: (
            _declared_numel(d, "0", t.numel()) if n.endswith("/data.pkl")
            else d[: 4 * t.numel()] if n.endswith("/data/0") else d))
    result = run_cli("merge", write_config(tmp_path / "m.yaml", base, [bad]), tmp_path / "out", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len([x for x in result.stderr.splitlines() if x.startswith("error: ")]) == 1, result.stderr
    assert str(bad / "pytorch_model.bin") in result.stderr and repr(name) in result.stderr, result.stderr
    assert "Re-download" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_bin_with_compressed_records_reads_the_values_saved(tmp_path):
    """A mapped record is read as stored: a compressed one would be its compressed bytes, so such a
    file is read whole (torch decompresses it)."""
    tensors = {"w": 0.02 * torch.randn(16, 8), "b": torch.randn(8)}
    d = tmp_path / "deflated"
    d.mkdir()
    torch.save(tensors, d / "pytorch_model.bin")
    with zipfile.ZipFile(d / "pytorch_model.bin") as z:
        members = [(info.filename, z.read(info.filename)) for info in z.infolist()]
    with zipfile.ZipFile(d / "pytorch_model.bin", "w", zipfile.ZIP_DEFLATED) as z:
        for n, data in members:
            z.writestr(n, data)
    ckpt = open_checkpoint(d)
    assert all(torch.equal(ckpt.read(n), t) for n, t in tensors.items())


# -- PEFT LoRA adapters, written by hand (PEFT's own are in tests/test_lora.py) -----------------------

def write_adapter(path: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int, alpha: float,
                  full: dict[str, torch.Tensor] | None = None, **config) -> Path:
    """A PEFT adapter directory as PEFT saves one: module -> (A, B), full tensors by name."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    for name, t in (full or {}).items():
        tensors[f"base_model.model.{name}"] = t.contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    modules = sorted({m.rsplit(".", 1)[-1] for m in factors})
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": modules, "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        **config}))
    return path


class TestLoraCheckpoint(CheckpointContract):
    """An adapter whose model holds exactly the given tensors: a zero base, and for each matrix
    B = the matrix, A = identity, scale 1 (exact in float64). Other tensors are the base's."""

    def make(self, tmp_path, tensors, side_files):
        adapted = {n for n, t in tensors.items() if t.ndim == 2 and n.endswith(".weight")}
        base = {n: torch.zeros_like(t) if n in adapted else t for n, t in tensors.items()}
        write_hf_checkpoint(tmp_path / "base", base)
        for name, data in side_files.items():
            (tmp_path / "base" / name).write_bytes(data)
        factors = {name.removesuffix(".weight"): (torch.eye(tensors[name].shape[1], dtype=tensors[name].dtype),
                                                  tensors[name]) for name in sorted(adapted)}
        adapters = {}
        for module, (a, b) in factors.items():  # one adapter per rank: PEFT needs one r (or a rank_pattern)
            adapters.setdefault(a.shape[0], {})[module] = (a, b)
        (r, first), *rest = adapters.items()
        pattern = {m: a.shape[0] for extra in rest for m, (a, _) in extra[1].items()}
        write_adapter(tmp_path / "adapter", {**first, **{m: f for _, e in rest for m, f in e.items()}}, r=r,
                      alpha=r, rank_pattern=pattern, alpha_pattern=pattern)
        return open_checkpoint(f"{tmp_path / 'base'}+{tmp_path / 'adapter'}")


def _exact_family(root: Path, k: int, seed: int = 0, rank: int = 2, dtype=torch.float32):
    """A base, k LoRA adapters of it and their dense twins (base + scale * B @ A), all values
    multiples of powers of two small enough that every sum and product is exact in float32: the
    adapter's task vector and the dense twin's are the same numbers."""
    from dist_svc.commands.demo import write_tokenizer
    from tests.conftest import TINY

    gen = torch.Generator().manual_seed(seed)

    def grid(shape, scale):  # integers in [-8, 8] times scale
        return torch.randint(-8, 9, shape, generator=gen).to(torch.float64) * scale

    shapes = TINY.shapes()
    base = {n: (1 + grid(s, 2.0**-10)) if len(s) == 1 else grid(s, 2.0**-10) for n, s in shapes.items()}
    write_hf_checkpoint(root / "base", {n: t.to(dtype) for n, t in base.items()}, 2, TINY.hf_config(dtype))
    write_tokenizer(root / "base", TINY.vocab_size)
    adapters, dense = [], []
    targets = [n for n in shapes if n.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))]
    for i in range(k):
        factors, ft = {}, dict(base)
        for name in targets:
            m, n = shapes[name]
            a, b = grid((rank, n), 2.0**-3), grid((m, rank), 2.0**-3)
            factors[name.removesuffix(".weight")] = (a.to(dtype), b.to(dtype))
            ft[name] = base[name] + 0.5 * (b @ a)  # scale = alpha / r = 1 / 2
        adapters.append(write_adapter(root / f"adapter-{i + 1}", factors, r=rank, alpha=1))
        write_hf_checkpoint(root / f"dense-{i + 1}", {n: t.to(dtype) for n, t in ft.items()}, 1, TINY.hf_config(dtype))
        dense.append(root / f"dense-{i + 1}")
        assert all(torch.equal(t.to(dtype).to(torch.float64), t) for t in ft.values())  # exact by construction
    return root / "base", adapters, dense


def test_adapters_merge_to_the_bytes_of_their_dense_twins_calibrated(tmp_path):
    base, adapters, dense = _exact_family(tmp_path, 3)
    run_cli("merge", write_config(tmp_path / "a.yaml", base, adapters), tmp_path / "a", "--shard-size", "40KB")
    run_cli("merge", write_config(tmp_path / "d.yaml", base, dense), tmp_path / "d", "--shard-size", "40KB")
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "d")


def test_mergekit_model_plus_adapter_syntax_applies_the_adapter_to_that_model(tmp_path, family):
    """`MODEL+ADAPTER` where MODEL is itself a fine-tune: its task vector is MODEL's plus the
    adapter's, the same bytes as the dense model that equals MODEL + scale * B @ A."""
    base, adapters, dense = _exact_family(tmp_path, 2)
    # The second model: dense-1 with adapter-2 on top, against its dense twin.
    d1 = load_file(str(tmp_path / "dense-1" / "model.safetensors"))
    d2 = load_file(str(tmp_path / "dense-2" / "model.safetensors"))
    b = {}
    for f in base.glob("*.safetensors"):
        b.update(load_file(str(f)))
    both = {n: d1[n] + (d2[n] - b[n]) for n in d1}  # exact: multiples of 2^-10 far from float32's limits
    write_hf_checkpoint(tmp_path / "both", both)
    cfg_a = write_config(tmp_path / "a.yaml", base, [dense[0]])
    text = cfg_a.read_text().replace(f"model: {dense[0]}", f"model: {dense[0]}+{adapters[1]}")
    cfg_a.write_text(text)
    run_cli("merge", cfg_a, tmp_path / "a", "--no-calibrate")
    run_cli("merge", write_config(tmp_path / "b.yaml", base, [tmp_path / "both"]), tmp_path / "b", "--no-calibrate")
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("problem", ["name", "shape", "dora", "alone", "pattern not a regex", "pattern list",
                                     "pattern string value", "pattern lookahead", "second adapter name",
                                     "unprefixed copy"])
def test_an_adapter_for_another_base_or_a_dora_adapter_is_one_clear_paragraph(tmp_path, problem):
    """Also a broken rank_pattern / alpha_pattern, and two keys for one factor (two adapters in
    one file, or a copy without PEFT's prefix), which would otherwise win by key order."""
    base, adapters, _ = _exact_family(tmp_path, 1)
    adapter = adapters[0]
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    needles = {"name": ["model.layers.7.", "another base"],
               "shape": ["model.layers.0.self_attn.q_proj.weight", "another base", "[32, 40]"],
               "dora": ["DoRA"], "alone": [],
               "pattern not a regex": ["adapter_config.json", "'rank_pattern' key 'q_proj['", "regular expression"],
               "pattern list": ["adapter_config.json", "'alpha_pattern' is a list", "mapping"],
               "pattern string value": ["adapter_config.json", "'alpha_pattern'", "'q_proj'", "'2'", "positive number"],
               "pattern lookahead": ["adapter_config.json", "'rank_pattern' key '(?=q)q_proj'", "lookahead"],
               "second adapter name": [f"'{Q0}.lora_A.other.weight'", f"'{Q0}.lora_A.weight'", "two adapters"],
               "unprefixed copy": [f"'{Q0.removeprefix('base_model.model.')}.lora_B.weight'",
                                   f"'{Q0}.lora_B.weight'", "two adapters"]}[problem]
    config.update({"pattern not a regex": {"rank_pattern": {"q_proj[": 2}},
                   "pattern list": {"alpha_pattern": ["q_proj"]},
                   "pattern string value": {"alpha_pattern": {"q_proj": "2"}},
                   "pattern lookahead": {"rank_pattern": {"(?=q)q_proj": 2}}}.get(problem, {}))
    if problem == "second adapter name":
        tensors[f"{Q0}.lora_A.other.weight"] = 2 * tensors[f"{Q0}.lora_A.weight"]
    elif problem == "unprefixed copy":
        tensors[f"{Q0.removeprefix('base_model.model.')}.lora_B.weight"] = 2 * tensors[f"{Q0}.lora_B.weight"]
    elif problem == "name":
        tensors = {k.replace("layers.0.", "layers.7."): v for k, v in tensors.items()}
    elif problem == "shape":
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        tensors[key] = torch.zeros(2, 40)
    elif problem == "dora":
        config["use_dora"] = True
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    if problem == "alone":  # an adapter is not a checkpoint by itself
        with pytest.raises(DistSvcError, match="is a PEFT adapter, which changes a base model"):
            open_checkpoint(adapter)
        return
    result = run_cli("merge", write_config(tmp_path / "m.yaml", base, [adapter]), tmp_path / "out", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len([x for x in result.stderr.splitlines() if x.startswith("error: ")]) == 1, result.stderr
    assert str(adapter) in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_pattern_keys_match_the_module_names_pythons_re_matches():
    """PEFT's `re.match(rf"(.*\\.)?({key})$", name)` and dist-svc's bounded matcher agree on
    keys built from every construct a rank pattern uses (anchors, classes, repeats, groups)."""
    atoms = ["q", "q_proj", r"\.", ".", r"\d", r"\d+", "[0-9]", "[^.]", r"\w+", "(0|1)", "layers", "_", "^", "$",
             r"\b", r"\B", "[a-z]*", "x?", "(a|)", "()", r"\W", r"[^\d]", "a{0,2}", r"\Z"]
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "q_proj", "layers.10.mlp.q", "",
             "a", "q\n", "x.q_proj.k"]
    rng = random.Random(1)
    keys = ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 4))) for _ in range(1500)]
    for key, name in itertools.product(keys, names):
        try:
            program = compile_key(key)
        except re.error:
            with pytest.raises(re.error):
                re.compile(rf"(.*\.)?({key})$")
            continue
        assert matches(program, name) == bool(re.match(rf"(.*\.)?({key})$", name)), (key, name)


def test_a_pattern_key_that_backtracks_without_end_in_python_re_is_matched_in_bounded_time(tmp_path):
    """PEFT matches `(.*\\.)?(KEY)$` with Python's re, whose time on `(.*)*v_proj` doubles with
    each character of a name it does not match. dist-svc gives the same answers in linear time:
    v_proj modules get alpha 2 (scale 1), the others keep alpha 1 (scale 1/2)."""
    base, adapters, dense = _exact_family(tmp_path, 1)
    config = json.loads((adapters[0] / "adapter_config.json").read_text())
    config["alpha_pattern"] = {"(.*)*v_proj": 2}
    (adapters[0] / "adapter_config.json").write_text(json.dumps(config))
    b, d = _load_dir(base), _load_dir(dense[0])
    twin = {n: b[n] + 2 * (d[n] - b[n]) if "v_proj" in n else d[n] for n in d}  # exact: powers of two
    write_hf_checkpoint(tmp_path / "twin", twin)
    run_cli("merge", write_config(tmp_path / "a.yaml", base, adapters), tmp_path / "a", "--no-calibrate", timeout=120)
    run_cli("merge", write_config(tmp_path / "b.yaml", base, [tmp_path / "twin"]), tmp_path / "b", "--no-calibrate")
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")


# -- Hugging Face Hub IDs from a real cache layout ----------------------------------------------------

def hub_cache(cache: Path, repo: str, files: dict[str, bytes], revision: str = "main") -> str:
    """Lay out one commit of a repository in a Hugging Face cache as huggingface_hub does:
    blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/<revision> = commit.
    Returns the commit."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(json.dumps(sorted((n, hashlib.sha256(d).hexdigest()) for n, d in files.items())).encode()
                          ).hexdigest()
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (folder / "blobs" / blob).write_bytes(data)
        link = snapshot / name
        if not link.exists():
            link.symlink_to(Path("../../blobs") / blob)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / revision).write_text(commit)
    return commit


def checkpoint_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


class TestHubCheckpoint(CheckpointContract):
    @pytest.fixture(autouse=True)
    def _offline(self, offline_hub):
        self.cache = offline_hub

    def make(self, tmp_path, tensors, side_files):
        write_hf_checkpoint(tmp_path / "src", tensors, shards=2)
        for name, data in side_files.items():
            (tmp_path / "src" / name).write_bytes(data)
        hub_cache(self.cache, "acme/tiny", checkpoint_files(tmp_path / "src"))
        return open_checkpoint("hf://acme/tiny")


def test_hub_ids_resolve_offline_with_their_commit_in_the_identity(tmp_path, family, offline_hub):
    base, fts = family(2)
    c_base = hub_cache(offline_hub, "acme/base", checkpoint_files(base))
    c_ft = hub_cache(offline_hub, "acme/ft-1", checkpoint_files(fts[0]), revision="v1")
    ckpt = open_checkpoint(source_of("acme/base"))
    assert ckpt.source == "hf://acme/base" and ckpt.identity()[0] == {"hub": "acme/base", "revision": "main",
                                                                      "commit": c_base}
    assert open_checkpoint(source_of("acme/ft-1@v1")).identity()[0]["commit"] == c_ft
    assert open_checkpoint(f"hf://acme/base@{c_base}").identity()[0]["commit"] == c_base
    with pytest.raises(DistSvcError, match="no revision 'v2'|not in the Hugging Face cache"):
        open_checkpoint("hf://acme/ft-1@v2")


def test_a_hub_merge_equals_the_local_one_and_a_moved_branch_is_a_changed_input(tmp_path, family, offline_hub):
    base, fts = family(2)
    hub_cache(offline_hub, "acme/base", checkpoint_files(base))
    hub_cache(offline_hub, "acme/ft-1", checkpoint_files(fts[0]))
    run_cli("merge", write_config(tmp_path / "local.yaml", base, fts), tmp_path / "local")
    cfg = tmp_path / "hub.yaml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: acme/base\nmodels:\n  - model: acme/ft-1\n"
                   f"  - model: {fts[1]}\n")
    run_cli("merge", cfg, tmp_path / "hub")
    assert file_bytes(tmp_path / "hub") == file_bytes(tmp_path / "local")
    manifest = json.loads((tmp_path / "hub" / "dist-svc-manifest.json").read_text())
    assert manifest["inputs"]["hf://acme/ft-1"]["tensors"][0]["hub"] == "acme/ft-1"
    # main moves to another commit (the second fine-tune's weights): the finished merge is another merge now.
    hub_cache(offline_hub, "acme/ft-1", checkpoint_files(fts[1]))
    result = run_cli("merge", cfg, tmp_path / "hub", check=False)
    assert result.returncode == 2 and "files of input hf://acme/ft-1 changed" in result.stderr, result.stderr


def test_a_hub_id_not_in_the_cache_while_offline_is_one_paragraph_and_nothing_is_written(tmp_path, family,
                                                                                          offline_hub):
    base, fts = family(1)
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: acme/missing@v3\n")
    result = run_cli("merge", cfg, tmp_path / "out", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len([x for x in result.stderr.splitlines() if x.startswith("error: ")]) == 1, result.stderr
    for needle in ("hf://acme/missing@v3", "not in the Hugging Face cache", str(offline_hub), "HF_HUB_OFFLINE"):
        assert needle in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
