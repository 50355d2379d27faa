"""Contract tests for the seams (docs/extending.md): every checkpoint reader, output layout and
executor subclasses one of these classes, providing how to make one, and gets these tests.

    class TestMyReader(CheckpointContract):
        def make(self, tmp_path, tensors, side_files): ...   # -> a Checkpoint holding them
"""

from __future__ import annotations

import json
import pickle
import time

import numpy as np
import pytest
import torch

from dist_svc import DistSvcError, merge
from dist_svc.storage import open_checkpoint
from dist_svc.storage.output import layout_for
from dist_svc.storage.types import TORCH_TO_ST, Checkpoint, tensor_bytes

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
BUFFER_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.bool]  # copied by a merge, never merged


def buffers_of_every_dtype() -> dict[str, torch.Tensor]:
    """What checkpoints carry besides weights: integer and bool tensors of every rank."""
    return {"model.position_ids": torch.arange(-3, 37, dtype=torch.int64).view(2, 20),
            "model.layers.0.self_attn.causal_mask": torch.tril(torch.ones(1, 1, 5, 5, dtype=torch.bool)),
            "model.layers.0.self_attn.bias": torch.arange(250, 256, dtype=torch.uint8),
            "model.norm.num_batches_tracked": torch.tensor(2**40 + 3, dtype=torch.int64),
            "model.table": torch.tensor([[-2**31, 2**31 - 1]], dtype=torch.int32)}


def tensors_of_every_shape(dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    # Large values, so that any rounding or byte-order slip shows in a bit-level comparison.
    return {"model.layers.0.mlp.up_proj.weight": (torch.randn(37, 11, generator=gen) * 1e3).to(dtype),
            "model.layers.0.input_layernorm.weight": torch.randn(11, generator=gen).to(dtype),
            "model.layers.1.conv.weight": torch.randn(3, 4, 5, generator=gen).to(dtype),
            "scale": torch.tensor(-0.3).to(dtype),
            "empty": torch.zeros(0, 4, dtype=dtype)}


def _bits(t: torch.Tensor) -> bytes:
    return bytes(tensor_bytes(t))


def _blake3(data: bytes) -> str:
    """The checksum a layout must record, computed with the BLAKE3 package directly."""
    import blake3

    return "blake3:" + blake3.blake3(data).hexdigest()


class CheckpointContract:
    """What the planner and the workers rely on from every `Checkpoint`."""

    SIDE = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b'{"version": "1.0"}'}

    def make(self, tmp_path, tensors: dict[str, torch.Tensor], side_files: dict[str, bytes]) -> Checkpoint:
        raise NotImplementedError

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_metadata_and_full_reads_are_exact_for_every_dtype(self, tmp_path, dtype):
        tensors = tensors_of_every_shape(dtype)
        ckpt = self.make(tmp_path, tensors, self.SIDE)
        assert isinstance(ckpt, Checkpoint) and isinstance(ckpt.source, str)
        assert sorted(ckpt.order()) == sorted(tensors) and len(ckpt.order()) == len(tensors)
        for name, t in tensors.items():
            info = ckpt.tensors[name]
            assert (info.name, info.dtype, info.shape) == (name, TORCH_TO_ST[dtype], tuple(t.shape))
            assert info.nbytes == t.numel() * t.element_size()
            got = ckpt.read(name)
            assert got.dtype == dtype and got.shape == t.shape and _bits(got) == _bits(t), name
        ckpt.close()

    def test_integer_and_bool_tensors_are_read_exactly_in_their_dtype(self, tmp_path):
        buffers = buffers_of_every_dtype()
        ckpt = self.make(tmp_path, {**tensors_of_every_shape(torch.float32), **buffers}, self.SIDE)
        for name, t in buffers.items():
            info = ckpt.tensors[name]
            assert (info.dtype, info.shape, info.nbytes) == (TORCH_TO_ST[t.dtype], tuple(t.shape),
                                                             t.numel() * t.element_size()), name
            got = ckpt.read(name)
            assert got.dtype == t.dtype and got.shape == t.shape and _bits(got) == _bits(t), name
            if t.ndim:
                assert _bits(ckpt.read(name, rows=slice(1, 2))) == _bits(t[1:2]), name
        ckpt.close()

    def test_row_and_column_slices_equal_slices_of_the_full_tensor(self, tmp_path):
        tensors = tensors_of_every_shape(torch.bfloat16)
        ckpt = self.make(tmp_path, tensors, self.SIDE)
        name = "model.layers.0.mlp.up_proj.weight"
        full = tensors[name]
        for rows in (slice(0, 1), slice(5, 30), slice(30, 100), slice(7, 7)):
            assert _bits(ckpt.read(name, rows=rows)) == _bits(full[rows])
        for cols in (slice(0, 3), slice(4, 11), slice(10, 20)):
            assert _bits(ckpt.read(name, cols=cols)) == _bits(full[:, cols])
        assert _bits(ckpt.read(name, rows=slice(2, 9), cols=slice(1, 2))) == _bits(full[2:9, 1:2])
        assert _bits(ckpt.read("model.layers.1.conv.weight", rows=slice(1, 2))) == \
            _bits(tensors["model.layers.1.conv.weight"][1:2])
        for axis in (0, 1):
            extent = ckpt.chunk_extent(name, axis)
            assert isinstance(extent, int) and extent >= 1

    def test_a_read_is_memory_of_its_own(self, tmp_path):
        tensors = tensors_of_every_shape(torch.float32)
        ckpt = self.make(tmp_path, tensors, self.SIDE)
        name = "model.layers.0.mlp.up_proj.weight"
        ckpt.read(name).zero_()
        ckpt.read(name, rows=slice(0, 4)).zero_()
        ckpt.read(name, cols=slice(0, 4)).zero_()
        assert torch.equal(ckpt.read(name), tensors[name])

    def test_side_files_and_identity(self, tmp_path):
        ckpt = self.make(tmp_path, tensors_of_every_shape(torch.float32), self.SIDE)
        for name, data in self.SIDE.items():
            assert ckpt.side_file(name) == data
        assert ckpt.side_file("generation_config.json") is None
        identity = ckpt.identity()
        assert json.loads(json.dumps(identity)) == identity  # JSON-able, for the fingerprint
        assert ckpt.identity() == identity  # stable


class OutputLayoutContract:
    """What the driver, the workers, `verify` and `convert` rely on from every `OutputLayout`."""

    FORMAT: str = ""
    OPTIONS: dict = {}
    SIDE = {"config.json": b'{"model_type": "llama"}'}

    def entries(self, tensors):
        return [(n, TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in tensors.items()]

    def write_all(self, layout, tensors, fresh=True) -> dict[str, str]:
        """Every tensor written as the driver drives a layout; returns name -> checksum."""
        recorded: dict[str, str] = {}
        assert layout.prepare(recorded) == []
        for name, t in tensors.items():
            writer = layout.writer(name, sync=False)
            assert isinstance(writer.columns, bool) and {"checksum", "write"} <= set(writer.seconds)
            data = _bits(t)
            half = len(data) // 2
            writer.write(data[:half])
            writer.write(data[half:])
            digest = writer.close()
            assert digest == _blake3(data)
            layout.make_durable([name])
            recorded[name] = digest
            if layout.on_recorded(name):
                assert layout.seal(recorded, set(recorded) if fresh else set()) == []
        assert layout.seal(recorded, set()) == []
        return recorded

    @pytest.mark.parametrize("dtype", DTYPES + BUFFER_DTYPES, ids=str)
    def test_what_is_written_reads_back_bit_exact_and_is_whole(self, tmp_path, dtype):
        import hashlib

        tensors = tensors_of_every_shape(dtype)
        out = tmp_path / "out"
        out.mkdir()
        layout = layout_for(self.FORMAT, out, self.entries(tensors), self.OPTIONS)
        assert layout.format == self.FORMAT and layout.out_dir == out
        recorded = self.write_all(layout, tensors)
        side = {n: hashlib.sha256(d).hexdigest() for n, d in self.SIDE.items()}
        assert layout.problems(recorded, side, deep=False)  # not finished yet
        layout.finish(recorded, self.SIDE)
        assert layout.problems(recorded, side, deep=True) == []
        for name in tensors:
            assert layout.stored_checksum(name) == recorded[name]
        got = open_checkpoint(out)  # a layout's output is a checkpoint again
        assert sorted(got.order()) == sorted(tensors)
        for name, t in tensors.items():
            assert _bits(got.read(name)) == _bits(t), name
        assert got.side_file("config.json") == self.SIDE["config.json"]

    def test_a_matrix_written_by_columns_in_any_order_is_the_same_tensor(self, tmp_path):
        tensors = tensors_of_every_shape(torch.bfloat16)
        name = "model.layers.0.mlp.up_proj.weight"
        layout = layout_for(self.FORMAT, tmp_path, self.entries(tensors), self.OPTIONS)
        layout.prepare({})
        matrix = tensors[name]
        writer = layout.writer(name, sync=True)
        assert writer.columns
        for start, stop in ((6, 11), (0, 3), (3, 6)):
            writer.write_columns(start, stop, tensor_bytes(matrix[:, start:stop]))
        assert writer.close() == _blake3(_bits(matrix)) == layout.stored_checksum(name)

    def test_a_layout_rebuilt_elsewhere_sees_the_same_output(self, tmp_path):
        tensors = tensors_of_every_shape(torch.float32)
        layout = layout_for(self.FORMAT, tmp_path, self.entries(tensors), self.OPTIONS)
        recorded = self.write_all(layout, tensors)
        again = pickle.loads(pickle.dumps(layout_for(self.FORMAT, tmp_path, self.entries(tensors), self.OPTIONS)))
        assert {n: again.stored_checksum(n) for n in tensors} == recorded

    def test_damage_is_found_by_prepare_and_by_a_deep_check_only(self, tmp_path):
        import hashlib

        tensors = tensors_of_every_shape(torch.float32)
        layout = layout_for(self.FORMAT, tmp_path, self.entries(tensors), self.OPTIONS)
        recorded = self.write_all(layout, tensors)
        layout.finish(recorded, self.SIDE)
        side = {n: hashlib.sha256(d).hexdigest() for n, d in self.SIDE.items()}
        name = "model.layers.0.mlp.up_proj.weight"
        stamps = layout.stamps(side)
        time.sleep(0.05)  # past the filesystem's timestamp granularity (a few ms)
        self.flip_a_byte(tmp_path, layout, name)
        assert layout.stored_checksum(name) != recorded[name]
        assert layout.problems(recorded, side, deep=False) == []
        assert any(name in p for p in layout.problems(recorded, side, deep=True))
        # The stamps (what the no-op rerun compares, no byte read) see it; damaged() or prepare() finds the tensor.
        now = layout.stamps(side)
        changed = [key for key in stamps if now.get(key) != stamps[key]]
        assert changed and name in layout.damaged(recorded, changed) + layout.prepare(recorded)
        (tmp_path / "config.json").unlink()
        assert any("config.json" in p for p in layout.problems(recorded, side, deep=False))

    def test_an_unrecorded_tensor_leaves_the_output_incomplete(self, tmp_path):
        tensors = tensors_of_every_shape(torch.float32)
        layout = layout_for(self.FORMAT, tmp_path, self.entries(tensors), self.OPTIONS)
        recorded = self.write_all(layout, tensors)
        del recorded["scale"]
        assert layout.problems(recorded, {}, deep=True)

    def flip_a_byte(self, root, layout, name) -> None:
        raise NotImplementedError


class ExecutorContract:
    """Every executor writes the bytes of the local executor with one thread (the reference)."""

    def executor(self):
        raise NotImplementedError

    def test_same_bytes_as_the_reference_executor(self, tmp_path, family):
        from dist_svc.executors import LocalExecutor
        from tests.conftest import file_bytes, write_config

        base, fts = family(3)
        cfg = write_config(tmp_path / "m.yaml", base, fts)
        merge(cfg, tmp_path / "ref", shard_size="40KB", progress="off", executor=LocalExecutor(threads=1))
        merge(cfg, tmp_path / "out", shard_size="40KB", progress="off", executor=self.executor())
        assert file_bytes(tmp_path / "out") == file_bytes(tmp_path / "ref")

    def test_a_users_mistake_found_by_a_worker_is_one_clear_error(self, tmp_path, family):
        from safetensors.torch import load_file, save_file

        from tests.conftest import write_config

        base, fts = family(2)
        path = fts[0] / "model.safetensors"
        tensors = load_file(str(path))
        tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
        save_file(tensors, str(path))
        with pytest.raises(DistSvcError, match="model.layers.0.mlp.up_proj.weight.*NaN"):
            merge(write_config(tmp_path / "m.yaml", base, fts), tmp_path / "out", progress="off",
                  executor=self.executor())
        assert np.isnan(load_file(str(path))["model.layers.0.mlp.up_proj.weight"][0, 0].item())  # untouched
