"""Reading safetensors checkpoints: every dtype, rows and columns, exactly as safetensors stores them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_svc.commands.demo import write_hf_checkpoint
from dist_svc.storage.safetensors_reader import SafetensorsCheckpoint
from tests.contracts import CheckpointContract, LocationContract, OutputDirContract, OutputLayoutContract


class TestSafetensorsCheckpoint(CheckpointContract):
    def make(self, tmp_path, tensors, side_files):
        write_hf_checkpoint(tmp_path / "ckpt", tensors, shards=2)
        for name, data in side_files.items():
            (tmp_path / "ckpt" / name).write_bytes(data)
        return SafetensorsCheckpoint(tmp_path / "ckpt")


class TestSafetensorsLayout(OutputLayoutContract):
    FORMAT = "safetensors"
    OPTIONS = {"shard_bytes": 1000}  # several shards, one tensor larger than a shard

    def flip_a_byte(self, root, layout, name):
        place = layout.placements[name]
        path = layout.final(place.shard)
        raw = bytearray(path.read_bytes())
        raw[place.offset + place.nbytes // 2] ^= 0x01
        path.write_bytes(bytes(raw))


class TestLocalLocation(LocationContract):
    def make(self, tmp_path, files):
        for name, data in files.items():
            self.rewrite(tmp_path / "ckpt", name, data)
        return tmp_path / "ckpt"

    def rewrite(self, where, name, data):
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        (where / name).write_bytes(data)


class TestLocalDir(OutputDirContract):
    def make(self, tmp_path):
        return tmp_path / "out"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_full_row_and_column_reads_return_the_stored_values(tmp_path, dtype):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(13, 7, generator=gen).to(dtype), "b": torch.randn(5, generator=gen).to(dtype),
               "c": torch.randn(3, 4, 2, generator=gen).to(dtype), "s": torch.tensor(2.5).to(dtype)}
    write_hf_checkpoint(tmp_path / "ckpt", tensors, shards=2)
    ckpt = SafetensorsCheckpoint(tmp_path / "ckpt")
    for name, t in tensors.items():
        got = ckpt.read(name)
        assert got.dtype == dtype and torch.equal(got, t), name
    assert torch.equal(ckpt.read("a", rows=slice(4, 9)), tensors["a"][4:9])
    assert torch.equal(ckpt.read("a", rows=slice(12, 20)), tensors["a"][12:])
    assert torch.equal(ckpt.read("a", cols=slice(2, 5)), tensors["a"][:, 2:5])
    assert torch.equal(ckpt.read("a", rows=slice(1, 3), cols=slice(6, 7)), tensors["a"][1:3, 6:7])
    assert torch.equal(ckpt.read("c", rows=slice(1, 2)), tensors["c"][1:2])
    assert torch.equal(ckpt.read("b", rows=slice(0, 0)), tensors["b"][:0])
    # A tensor read is owned memory: changing it changes nothing else.
    got = ckpt.read("a")
    got.zero_()
    assert torch.equal(ckpt.read("a"), tensors["a"])
    ckpt.close()


def test_a_single_file_checkpoint_reads_like_safetensors_does(tmp_path):
    tensors = {"x": torch.arange(12.0).view(3, 4), "y": torch.ones(2, dtype=torch.bfloat16)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ckpt = SafetensorsCheckpoint(tmp_path)
    for name, t in load_file(str(tmp_path / "model.safetensors")).items():
        assert torch.equal(ckpt.read(name), t)


_PEAK_OF_READS = """
import re, sys
from dist_svc.storage import open_checkpoint

def peak_growth(read):
    # Reset the kernel's high-water mark of resident memory, read, and see how far it rose.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    status = lambda key: int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
    before = status("VmRSS")
    result = read()
    return status("VmHWM") - before, result

ckpt = open_checkpoint(sys.argv[1])
rows_grew, rows = peak_growth(lambda: ckpt.read("big", rows=slice(1000, 2024)))
cols_grew, cols = peak_growth(lambda: ckpt.read("big", cols=slice(0, 64)))
print(rows_grew, cols_grew, float(rows.sum()), float(cols.sum()))
"""


@pytest.mark.parametrize("fmt", ["safetensors", "zarr"])
def test_reading_slices_of_a_large_tensor_costs_memory_for_the_slice_not_the_tensor(tmp_path, fmt):
    """A 256 MiB tensor on disk; a 16 MiB row slice and a 4 MiB column slice, each read in a
    process whose peak resident memory is measured around the read (Linux VmHWM, reset first)."""
    import subprocess
    import sys

    from dist_svc.commands.convert import convert

    rows, cols = 16384, 4096  # float32: 256 MiB
    (tmp_path / "st").mkdir()
    save_file({"big": torch.ones(rows, cols)}, str(tmp_path / "st" / "model.safetensors"))
    path = tmp_path / "st"
    if fmt == "zarr":
        path = tmp_path / "big.zarr"
        convert(tmp_path / "st", path, progress="off")  # tiles of 2048 x 2048 float32: 16 MiB each
    out = subprocess.run([sys.executable, "-c", _PEAK_OF_READS, str(path)],
                         capture_output=True, text=True, check=True).stdout.split()
    rows_grew, cols_grew = int(out[0]), int(out[1])
    assert float(out[2]) == 1024 * 4096 and float(out[3]) == rows * 64
    mib = 2**20
    if fmt == "zarr":
        # Rows 1000..2024 lie in the two tiles of rows 0..2047: the slice, plus those tiles.
        assert rows_grew < (16 + 2 * 16 + 8) * mib, f"row read: peak grew {rows_grew / mib:.0f} MiB"
        # Columns 0..63 lie in 8 tiles, decoded CONCURRENCY (4) at a time, each held as read and
        # as decoded: 4 + 4 * 2 * 16 MiB at most (88 MiB measured), never the whole tensor.
        assert cols_grew < (4 + 4 * 2 * 16 + 16) * mib, f"column read: peak grew {cols_grew / mib:.0f} MiB"
        return
    # Rows: the slice itself (preadv into its buffer), plus allocator slack.
    assert rows_grew < (16 + 8) * mib, f"row read: peak grew {rows_grew / mib:.0f} MiB"
    # Columns: the 4 MiB result plus one 32 MiB mapping window at a time (MAP_WINDOW).
    assert cols_grew < (4 + 32 + 8) * mib, f"column read: peak grew {cols_grew / mib:.0f} MiB"


def test_checksums_are_blake3_named_by_their_algorithm_and_sha256_is_still_read(tmp_path):
    """The published BLAKE3 and sha256 test vectors for the empty input and for "abc"; a digest
    without a known algorithm, or of the wrong length, is not one; a file range hashes like the
    same bytes in memory."""
    import os

    from dist_svc.storage.checksum import Hasher, algorithm_of, checksum, is_digest, range_checksum

    assert checksum(b"") == "blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    assert checksum(b"abc", "sha256") == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert algorithm_of(checksum(b"abc")) == "blake3"
    for bad in ("af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262", "md5:" + "0" * 64,
                "blake3:" + "0" * 63, "blake3:" + "g" * 64, None, 7):
        assert not is_digest(bad)
    with pytest.raises(ValueError):
        Hasher("md5")
    data = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(data)
    pieces = Hasher()
    for i in range(0, len(data) - 100, 1 << 20):
        pieces.update(data[100 + i:100 + min(i + (1 << 20), len(data) - 100)])
    assert range_checksum(tmp_path / "f", 100, len(data) - 100) == checksum(data[100:]) == pieces.digest()
    assert range_checksum(tmp_path / "f", 100, len(data)) is None  # past the end
    assert range_checksum(tmp_path / "missing", 0, 1) is None
