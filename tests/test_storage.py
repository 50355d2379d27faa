"""Reading safetensors checkpoints: every dtype, rows and columns, exactly as safetensors stores them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_svc.demo import write_hf_checkpoint
from dist_svc.storage.safetensors_reader import SafetensorsCheckpoint


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
