"""zarr v3 as input and output: exact round trips, merges equal to the safetensors ones, and
corruption found by `verify`, by a merge and by `convert`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dist_svc import merge
from dist_svc.commands.convert import convert
from dist_svc.commands.demo import write_hf_checkpoint
from dist_svc.driver import verify
from dist_svc.errors import DistSvcError
from dist_svc.storage import open_checkpoint
from dist_svc.storage.types import tensor_bytes
from dist_svc.storage.zarr_format import DTYPE_ATTR
from dist_svc.storage.zarr_reader import ZarrCheckpoint
from tests.conftest import file_bytes, run_cli, write_config
from tests.contracts import CheckpointContract, OutputLayoutContract, tensors_of_every_shape
from tests.reference import load_output


class TestZarrCheckpoint(CheckpointContract):
    def make(self, tmp_path, tensors, side_files):
        write_hf_checkpoint(tmp_path / "src", tensors)
        for name, data in side_files.items():
            (tmp_path / "src" / name).write_bytes(data)
        convert(tmp_path / "src", tmp_path / "ckpt.zarr", progress="off")
        return ZarrCheckpoint(tmp_path / "ckpt.zarr")


class TestZarrLayout(OutputLayoutContract):
    FORMAT = "zarr"
    OPTIONS = {"compression": "zstd"}

    def flip_a_byte(self, root, layout, name):
        _flip_a_chunk_byte(root / name)


def _flip_a_chunk_byte(array_dir) -> None:
    chunk = next(p for p in sorted((array_dir / "c").rglob("*")) if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_safetensors_to_zarr_to_safetensors_is_bit_exact(tmp_path, dtype):
    tensors = tensors_of_every_shape(dtype)
    write_hf_checkpoint(tmp_path / "src", tensors, shards=2, config={"model_type": "llama"})
    convert(tmp_path / "src", tmp_path / "m.zarr", progress="off")
    convert(tmp_path / "m.zarr", tmp_path / "back", progress="off", shard_size=1)
    z = ZarrCheckpoint(tmp_path / "m.zarr")
    back = {}
    for f in (tmp_path / "back").glob("*.safetensors"):
        back.update(load_file(str(f)))
    for name, t in tensors.items():
        assert z.tensors[name].shape == tuple(t.shape)
        got = z.read(name)
        assert got.dtype == dtype and got.shape == t.shape and torch.equal(_bits(got), _bits(t)), name
        assert back[name].dtype == dtype and back[name].shape == t.shape and torch.equal(_bits(back[name]), _bits(t))
    if dtype == torch.bfloat16:  # stored as its bits, named by an attribute
        meta = json.loads((tmp_path / "m.zarr" / "model.layers.0.input_layernorm.weight" / "zarr.json").read_text())
        assert meta["data_type"] == "uint16" and meta["attributes"][DTYPE_ATTR] == "bfloat16"
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == {"model_type": "llama"}
    assert len(list((tmp_path / "back").glob("*.safetensors"))) == len(tensors)  # shard_size=1: one each


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_row_and_column_slices_of_zarr_equal_full_reads(tmp_path, compression):
    big = torch.randn(3000, 700, generator=torch.Generator().manual_seed(2))
    write_hf_checkpoint(tmp_path / "src", {"w": big, "v": big[0].clone()})
    convert(tmp_path / "src", tmp_path / "m.zarr", compression=compression, progress="off")
    from dist_svc.storage import zarr_format

    z = ZarrCheckpoint(tmp_path / "m.zarr")
    full = z.read("w")
    assert torch.equal(full, big)
    for rows in (slice(0, 1), slice(5, 2999), slice(2990, 3100), slice(7, 7)):
        assert torch.equal(z.read("w", rows=rows), full[rows])
    assert torch.equal(z.read("w", cols=slice(100, 333)), full[:, 100:333])
    assert torch.equal(z.read("w", rows=slice(10, 20), cols=slice(1, 2)), full[10:20, 1:2])
    assert zarr_format.chunk_shape((3000, 700), "F32") == (2048, 700)  # tiles, clipped to the matrix
    assert zarr_format.chunk_shape((5, 3, 4), "BF16") == (5, 3, 4)


def test_a_merge_of_zarr_inputs_equals_the_merge_of_the_same_safetensors_inputs(tmp_path, family):
    base, fts = family(3, dtype=torch.bfloat16)
    cfg = write_config(tmp_path / "st.yaml", base, fts)
    merge(cfg, tmp_path / "out-st", shard_size="40KB", progress="off")
    zbase = tmp_path / "base.zarr"
    convert(base, zbase, progress="off")
    zfts = [fts[0]]  # mixed: one fine-tune stays safetensors
    for i, f in enumerate(fts[1:]):
        convert(f, tmp_path / f"ft{i}.zarr", compression="zstd" if i else "none", progress="off")
        zfts.append(tmp_path / f"ft{i}.zarr")
    cfg_z = write_config(tmp_path / "z.yaml", zbase, zfts)
    merge(cfg_z, tmp_path / "out-z", shard_size="40KB", progress="off")
    assert file_bytes(tmp_path / "out-z") == file_bytes(tmp_path / "out-st")


def test_zarr_output_holds_the_same_tensors_and_verify_finds_a_flipped_byte(tmp_path, family):
    base, fts = family(3)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    merge(cfg, tmp_path / "out-st", shard_size="40KB", progress="off")
    out = tmp_path / "merged.zarr"  # the suffix chooses zarr
    run_cli("merge", cfg, out, "--progress", "off")
    expected = load_output(tmp_path / "out-st")
    z = open_checkpoint(out)
    assert set(z.tensors) == set(expected)
    for name, t in expected.items():
        assert torch.equal(z.read(name), t), name
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert verify(out) == []
    assert "zarr" in run_cli("status", out).stdout or "complete" in run_cli("status", out).stdout
    # The same manifest checksums as the safetensors output: the bytes are the same.
    m_z = json.loads((out / "dist-svc-manifest.json").read_text())["units"]
    m_s = json.loads((tmp_path / "out-st" / "dist-svc-manifest.json").read_text())["units"]
    assert {n: u["checksum"] for n, u in m_z.items()} == {n: u["checksum"] for n, u in m_s.items()}

    _flip_a_chunk_byte(out / "model.layers.0.mlp.up_proj.weight")
    problems = verify(out)
    assert len(problems) == 1 and "model.layers.0.mlp.up_proj.weight" in problems[0]
    proc = run_cli("verify", out, check=False)
    assert proc.returncode == 1 and "up_proj" in proc.stdout + proc.stderr


def test_a_truncated_or_missing_zarr_chunk_is_caught_by_a_merge(tmp_path, family):
    base, fts = family(2)
    zft = tmp_path / "ft.zarr"
    convert(fts[0], zft, progress="off")
    cfg = write_config(tmp_path / "m.yaml", base, [zft, fts[1]])
    chunks = sorted(p for p in (zft / "model.layers.1.mlp.down_proj.weight").rglob("*") if p.is_file()
                    and p.name != "zarr.json")
    before = {p: p.read_bytes() for p in zft.rglob("*") if p.is_file()}
    chunks[0].write_bytes(chunks[0].read_bytes()[:-10])  # truncated
    proc = run_cli("merge", cfg, tmp_path / "out", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.layers.1.mlp.down_proj.weight" in proc.stderr and str(zft) in proc.stderr
    chunks[0].unlink()  # missing: zarr alone would read zeros
    proc = run_cli("merge", cfg, tmp_path / "out2", check=False)
    assert proc.returncode == 2 and "chunk" in proc.stderr and "down_proj" in proc.stderr
    assert not (tmp_path / "out2").exists()
    assert all(p.read_bytes() == b for p, b in before.items() if p != chunks[0])  # inputs untouched


def test_convert_never_overwrites_and_leaves_nothing_behind_on_error(tmp_path, family):
    base, _ = family(1)
    (tmp_path / "taken.zarr").mkdir()
    proc = run_cli("convert", base, tmp_path / "taken.zarr", check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    proc = run_cli("convert", tmp_path / "nothing-here", tmp_path / "x.zarr", check=False)
    assert proc.returncode == 2 and "nothing-here" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["taken.zarr", base.parent.name])


def test_a_zarr_output_merge_killed_and_rerun_resumes_and_finds_a_lost_chunk(tmp_path, family):
    base, fts = family(3)
    cfg = write_config(tmp_path / "m.yaml", base, fts, output={"format": "zarr"})
    out = tmp_path / "out"
    merge(cfg, out, progress="off")
    reference = {n: open_checkpoint(out).read(n) for n in open_checkpoint(out).tensors}
    # Simulate a run stopped after some units: mark two undone and damage one finished unit.
    manifest = json.loads((out / "dist-svc-manifest.json").read_text())
    names = sorted(manifest["units"])
    for n in names[:2]:
        manifest["units"][n].update(done=False, checksum=None)
    manifest["complete"] = False
    (out / "dist-svc-manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(out / names[5] / "c")
    report = merge(cfg, out, progress="off")
    assert report.units_run == 3  # the two undone and the one whose chunks were lost
    got = open_checkpoint(out)
    assert all(torch.equal(got.read(n), reference[n]) for n in names)
    assert verify(out) == []


def test_the_output_format_the_config_names_wins_over_the_directory_suffix(tmp_path, family):
    base, fts = family(1)
    cfg = write_config(tmp_path / "m.yaml", base, fts, output={"format": "safetensors"})
    merge(cfg, tmp_path / "odd-name.zarr", progress="off")
    assert (tmp_path / "odd-name.zarr" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "odd-name.zarr" / "zarr.json").exists()
    merge(cfg, tmp_path / "flag", progress="off", output_format="zarr")  # the flag wins over both
    assert (tmp_path / "flag" / "zarr.json").is_file()


def test_a_store_finished_before_blake3_is_still_checked_by_its_sha256(tmp_path):
    """Stores completed by an earlier dist-svc record `dist_svc.sha256` (bare hex): convert
    compares what it reads with that, and refuses a store whose bytes changed."""
    import hashlib

    tensors = tensors_of_every_shape(torch.float32)
    write_hf_checkpoint(tmp_path / "src", tensors)
    convert(tmp_path / "src", tmp_path / "m.zarr", progress="off")
    for name, t in tensors.items():
        meta_path = tmp_path / "m.zarr" / name / "zarr.json"
        meta = json.loads(meta_path.read_text())
        assert meta["attributes"].pop("dist_svc.checksum").startswith("blake3:")
        meta["attributes"]["dist_svc.sha256"] = hashlib.sha256(bytes(tensor_bytes(t))).hexdigest()
        meta_path.write_text(json.dumps(meta))
    assert ZarrCheckpoint(tmp_path / "m.zarr").checksum(name).startswith("sha256:")
    convert(tmp_path / "m.zarr", tmp_path / "back", progress="off")  # every tensor matches
    _flip_a_chunk_byte(tmp_path / "m.zarr" / "model.layers.0.mlp.up_proj.weight")
    with pytest.raises(DistSvcError, match="up_proj.*does not match the checksum"):
        convert(tmp_path / "m.zarr", tmp_path / "back2", progress="off")
    assert not (tmp_path / "back2").exists()


def test_tensors_of_zeros_are_stored_with_every_chunk_and_verify(tmp_path):
    """zarr skips a chunk equal to its fill value unless told not to; a store dist-svc completes
    has every chunk file (that is how a missing one is told from zeros), zeros included: a bias
    at 0, a counter at 0, an empty mask tile."""
    import hashlib

    tensors = {"bias": torch.zeros(4), "counter": torch.tensor(0, dtype=torch.int64),
               "mask": torch.zeros(3, 3, dtype=torch.bool)}
    layout = TestZarrLayout()
    layout.OPTIONS = {"compression": "none"}
    out = tmp_path / "out.zarr"
    out.mkdir()
    from dist_svc.storage.output import layout_for

    zarr_layout = layout_for("zarr", out, layout.entries(tensors), layout.OPTIONS)
    recorded = layout.write_all(zarr_layout, tensors)
    zarr_layout.finish(recorded, layout.SIDE)
    side = {n: hashlib.sha256(d).hexdigest() for n, d in layout.SIDE.items()}
    assert zarr_layout.problems(recorded, side, deep=True) == []
    for name in tensors:
        assert [p for p in (out / name).rglob("*") if p.is_file() and p.name != "zarr.json"], name
