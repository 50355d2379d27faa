"""Contract tests for the seams (docs/extending.md): every checkpoint reader, output layout,
executor, location and output directory subclasses one of these classes, providing how to make
one, and gets these tests (in the style of zarr's `StoreTests`).

    class TestMyReader(CheckpointContract):
        def make(self, tmp_path, tensors, side_files): ...   # -> a Checkpoint holding them

    class TestMyStorage(OutputDirContract):
        def make(self, tmp_path): ...   # -> the path or URL of a new, empty output directory
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
from dist_svc.storage.location import Location, location
from dist_svc.storage.outdir import OutputDir, output_dir
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
    """What the driver, the workers, `verify` and `convert` rely on from every `OutputLayout`,
    in every kind of output directory its subclasses name (`out_dir`: a local directory by
    default; an s3:// prefix in tests/test_object_storage.py)."""

    FORMAT: str = ""
    OPTIONS: dict = {}
    SIDE = {"config.json": b'{"model_type": "llama"}'}

    def out_dir(self, tmp_path):
        """OUT_DIR for one test: a path or a URL, new and empty."""
        return tmp_path

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
        out = self.out_dir(tmp_path)
        output_dir(out).mkdir()
        layout = layout_for(self.FORMAT, out, self.entries(tensors), self.OPTIONS)
        assert layout.format == self.FORMAT and layout.out_dir == out
        recorded = self.write_all(layout, tensors)
        side = {n: hashlib.sha256(d).hexdigest() for n, d in self.SIDE.items()}
        assert layout.problems(recorded, side, deep=False)  # not finished yet
        layout.finish(recorded, self.SIDE)
        problems = layout.problems(recorded, side, deep=True)
        assert problems == [], problems
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
        layout = layout_for(self.FORMAT, self.out_dir(tmp_path), self.entries(tensors), self.OPTIONS)
        layout.prepare({})
        matrix = tensors[name]
        writer = layout.writer(name, sync=True)
        if not writer.columns:
            writer.abort()
            pytest.skip("this layout's writer takes rows in order only here (columns=False)")
        for start, stop in ((6, 11), (0, 3), (3, 6)):
            writer.write_columns(start, stop, tensor_bytes(matrix[:, start:stop]))
        assert writer.close() == _blake3(_bits(matrix)) == layout.stored_checksum(name)

    def test_a_layout_rebuilt_elsewhere_sees_the_same_output(self, tmp_path):
        tensors = tensors_of_every_shape(torch.float32)
        out = self.out_dir(tmp_path)
        layout = layout_for(self.FORMAT, out, self.entries(tensors), self.OPTIONS)
        recorded = self.write_all(layout, tensors)
        again = pickle.loads(pickle.dumps(layout_for(self.FORMAT, out, self.entries(tensors), self.OPTIONS)))
        assert {n: again.stored_checksum(n) for n in tensors} == recorded

    def test_damage_is_found_by_prepare_and_by_a_deep_check_only(self, tmp_path):
        import hashlib

        tensors = tensors_of_every_shape(torch.float32)
        out = self.out_dir(tmp_path)
        layout = layout_for(self.FORMAT, out, self.entries(tensors), self.OPTIONS)
        recorded = self.write_all(layout, tensors)
        layout.finish(recorded, self.SIDE)
        side = {n: hashlib.sha256(d).hexdigest() for n, d in self.SIDE.items()}
        name = "model.layers.0.mlp.up_proj.weight"
        stamps = layout.stamps(side)
        time.sleep(0.05)  # past the filesystem's timestamp granularity (a few ms)
        self.flip_a_byte(out, layout, name)
        assert layout.stored_checksum(name) != recorded[name]
        assert layout.problems(recorded, side, deep=False) == []
        assert any(name in p for p in layout.problems(recorded, side, deep=True))
        # The stamps (what the no-op rerun compares, no byte read) see it; damaged() or prepare() finds the tensor.
        now = layout.stamps(side)
        changed = [key for key in stamps if now.get(key) != stamps[key]]
        assert changed and name in layout.damaged(recorded, changed) + layout.prepare(recorded)
        output_dir(out).delete("config.json")
        assert any("config.json" in p for p in layout.problems(recorded, side, deep=False))

    def test_an_unrecorded_tensor_leaves_the_output_incomplete(self, tmp_path):
        tensors = tensors_of_every_shape(torch.float32)
        layout = layout_for(self.FORMAT, self.out_dir(tmp_path), self.entries(tensors), self.OPTIONS)
        recorded = self.write_all(layout, tensors)
        del recorded["scale"]
        assert layout.problems(recorded, {}, deep=True)

    def flip_a_byte(self, out, layout, name) -> None:
        """Change one byte of tensor `name` as stored in OUT_DIR `out` (as `out_dir` named it)."""
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


class LocationContract:
    """What the readers rely on from every `Location` (where checkpoints are read from)."""

    FILES = {"model.safetensors": bytes(range(256)) * 40, "config.json": b'{"model_type": "llama"}',
             "sub/c/0": b"chunk zero", "sub/c/1": b"chunk one!", "sub/zarr.json": b"{}"}

    def make(self, tmp_path, files: dict[str, bytes]) -> "str | Path":
        """A path or URL under which each of `files` (name relative to it -> bytes) is stored."""
        raise NotImplementedError

    def rewrite(self, where, name: str, data: bytes) -> None:
        """Store `data` as `name` again (what a user does to a checkpoint in place)."""
        raise NotImplementedError

    def test_the_flags_are_declared_and_the_path_follows_file_paths(self, tmp_path):
        """Catches an implementation that does not declare a capability (readers would fail on
        it with an AttributeError), and a `path` that is not there to open (torch.load)."""
        loc = location(self.make(tmp_path, self.FILES))
        assert isinstance(loc, Location)
        for flag in ("file_paths", "ordered_versions", "cheap_lookups"):
            assert isinstance(getattr(type(loc), flag), bool), flag
        if loc.file_paths:
            assert (loc.path / "config.json").read_bytes() == self.FILES["config.json"]
        else:
            assert loc.path is None

    def test_files_are_listed_and_read_whole_by_name(self, tmp_path):
        """Catches a listing that includes nested files or misses direct ones (discovery of a
        checkpoint's shards), and nested names that `is_file` cannot see (zarr chunks)."""
        loc = location(self.make(tmp_path, self.FILES))
        assert loc.exists() and loc.is_dir()
        assert loc.names() == ["config.json", "model.safetensors"]
        assert loc.is_file("config.json") and loc.is_file("sub/c/1")
        assert not loc.is_file("generation_config.json") and not loc.is_file("sub/c/9")
        assert loc.read_bytes("config.json") == self.FILES["config.json"]
        assert loc.read_bytes("generation_config.json") is None
        assert loc.child("sub").read_bytes("zarr.json") == b"{}"
        assert loc.child("sub").parent().names() == loc.names()
        assert loc.where("config.json").endswith("config.json") and str(loc) == loc.url

    def test_a_file_reads_back_by_position_and_a_short_read_is_an_error(self, tmp_path):
        """Catches an off-by-one in ranged reads (every tensor read is one), a read that
        silently returns fewer bytes than asked, and a size that is not the file's."""
        data = self.FILES["model.safetensors"]
        f = location(self.make(tmp_path, self.FILES)).file("model.safetensors")
        assert f.size == len(data) and f.name == "model.safetensors"
        for offset, nbytes in ((0, 1), (7, 1000), (len(data) - 9, 9), (100, 0)):
            assert f.read(offset, nbytes) == data[offset:offset + nbytes]
        buf = bytearray(300)
        f.read_into(1234, buf)
        assert bytes(buf) == data[1234:1534]
        with pytest.raises((OSError, DistSvcError)):
            f.read(len(data) - 4, 8)
        f.close()

    def test_columns_read_back_as_the_same_slice_of_the_matrix(self, tmp_path):
        """Catches a strided read that mixes rows up (a column read of a wide matrix)."""
        data = self.FILES["model.safetensors"]
        f = location(self.make(tmp_path, self.FILES)).file("model.safetensors")
        matrix = np.frombuffer(data[16:16 + 40 * 30 * 2], dtype=np.uint16).reshape(40, 30)
        got = f.read_columns(16, (40, 30), 2, range(3, 37), range(5, 11))
        assert np.array_equal(got, matrix[3:37, 5:11])
        f.close()

    def test_walk_gives_every_file_under_a_prefix_with_its_size(self, tmp_path):
        """Catches keys not relative to the prefix, or missing files (zarr's identity and
        chunk checks count them)."""
        loc = location(self.make(tmp_path, self.FILES))
        walked = {key: size for key, size, _ in loc.walk("sub/c")}
        assert walked == {"0": len(self.FILES["sub/c/0"]), "1": len(self.FILES["sub/c/1"])}

    def test_identity_and_version_change_when_a_file_is_written_again(self, tmp_path):
        """Catches an identity that does not see a rewrite that keeps the size (a merge would
        be believed up to date with its inputs changed)."""
        where = self.make(tmp_path, self.FILES)
        loc = location(where)
        before = loc.file("config.json").identity()
        version = dict((k, v) for k, _, v in loc.walk("sub/c"))["0"]
        assert json.loads(json.dumps(before)) == before
        time.sleep(0.05)  # past the filesystem's timestamp granularity
        self.rewrite(where, "config.json", self.FILES["config.json"].replace(b"llama", b"LLAMA"))
        self.rewrite(where, "sub/c/0", b"chunk ZERO")
        again = location(where)
        assert again.file("config.json").identity() != before
        newer = dict((k, v) for k, _, v in again.walk("sub/c"))["0"]
        assert newer != version
        if again.ordered_versions:
            assert newer > version

    def test_a_storage_failure_is_one_paragraph_or_left_to_the_reader(self, tmp_path):
        """Catches a failure of the storage service that would reach the user as a traceback
        (or a local file's error dressed up as the service's)."""
        loc = location(self.make(tmp_path, self.FILES))
        problem = loc.problem(ConnectionError("the endpoint went away"), "WHAT")
        assert problem is None or (isinstance(problem, DistSvcError) and str(problem).startswith("WHAT"))

    def test_a_location_travels_to_another_process(self, tmp_path):
        """Catches a location that cannot be pickled (Ray actors receive checkpoints)."""
        loc = pickle.loads(pickle.dumps(location(self.make(tmp_path, self.FILES))))
        assert loc.read_bytes("config.json") == self.FILES["config.json"]


class OutputDirContract:
    """What the manifest, the run's lock and the output layouts rely on from every `OutputDir`
    (where output goes). A subclass names a new, empty directory (`make`)."""

    def make(self, tmp_path) -> "str | Path":
        raise NotImplementedError

    def out(self, tmp_path) -> OutputDir:
        out = output_dir(self.make(tmp_path))
        out.mkdir()
        return out

    def test_the_flags_are_declared_with_what_each_promises(self, tmp_path):
        """Catches an implementation that does not declare a capability, or declares one without
        the methods it promises (a layout would fail midway through a merge)."""
        out = self.out(tmp_path)
        assert isinstance(out, OutputDir)
        promised = {"write_at_offset": ["path"], "conditional_put": ["create", "replace_if"],
                    "multipart_assembly": ["writer", "assemble", "abort_uploads"], "ordered_versions": []}
        for flag, members in promised.items():
            assert isinstance(getattr(type(out), flag), bool), flag
            for member in members:
                assert hasattr(out, member) == getattr(out, flag), (flag, member)

    def test_a_file_is_written_whole_and_read_back_by_range(self, tmp_path):
        """Catches a write that is not readable at once, ranges off by one, a checksum of the
        wrong bytes, and a missing file that reads as empty instead of absent."""
        out = self.out(tmp_path)
        data = bytes(range(256)) * 64
        assert not out.exists() or out.names() == []
        out.write("a/b.bin", data)
        out.write("top.json", b"{}")
        assert out.exists() and out.is_dir() and "top.json" in out.names()
        assert out.read("a/b.bin") == data and out.size("a/b.bin") == len(data)
        assert out.read_range("a/b.bin", 100, 4000) == data[100:4000] and out.read_range("a/b.bin", 5, 5) == b""
        assert out.range_checksum("a/b.bin", 100, 3900) == _blake3(data[100:4000])
        assert out.range_checksum("a/b.bin", len(data) - 10, 20) is None  # past the end: not whole
        assert out.read("nothing") is None and out.size("nothing") is None and out.stamp("nothing") is None
        out.sync("a")
        out.delete("top.json")
        out.delete("top.json")  # absent: nothing to do
        assert out.read("top.json") is None

    def test_a_rewrite_of_the_same_size_changes_the_stamp(self, tmp_path):
        """Catches a stamp that does not see a file changed in place (a finished merge whose
        output changed would be believed whole by a rerun)."""
        out = self.out(tmp_path)
        out.write("f", b"x" * 100)
        before = out.stamp("f")
        time.sleep(0.05)  # past the filesystem's timestamp granularity
        out.write("f", b"y" * 100)
        assert before is not None and out.stamp("f") not in (None, before)

    def test_walk_lists_every_file_under_a_prefix_once(self, tmp_path):
        """Catches keys not relative to the prefix, files of a neighbouring prefix, and
        deletions that leave files (a staged tensor or chunk counted twice or missed)."""
        out = self.out(tmp_path)
        files = {"s/x/1": b"1", "s/x/2": b"22", "s/y": b"333", "sx": b"4444", "t": b"55555"}
        for name, data in files.items():
            out.write(name, data)
        assert sorted((k, n) for k, n, _ in out.walk("s")) == [("x/1", 1), ("x/2", 2), ("y", 3)]
        assert sorted(k for k, _, _ in out.walk("")) == sorted(files)
        assert list(out.walk("none")) == []
        out.delete_many(["s/x/1", "s/y"])
        assert [k for k, _, _ in out.walk("s")] == ["x/2"]

    def test_the_journal_returns_every_append_in_order_to_a_new_reader(self, tmp_path):
        """Catches a lost or reordered append (a recorded tensor forgotten on resume), a journal
        that only this instance can read back, and one that outlives its removal."""
        where = self.make(tmp_path)
        out = output_dir(where)
        out.mkdir()
        assert out.journal_read("m.journal") == b""
        for k in range(3):
            out.journal_append("m.journal", b"record %d\n" % k)
        out.journal_close()
        again = output_dir(where)
        assert again.journal_read("m.journal") == b"record 0\nrecord 1\nrecord 2\n"
        again.journal_append("m.journal", b"record 3\n")
        assert output_dir(where).journal_read("m.journal").endswith(b"record 2\nrecord 3\n")
        assert again.journals("*.journal") == ["m.journal"] and again.journals("other*") == []
        again.journal_remove("m.journal")
        assert output_dir(where).journal_read("m.journal") == b"" and again.journals("*.journal") == []

    def test_replace_keeps_the_version_it_replaces(self, tmp_path):
        """Catches a replace that loses the previous snapshot (the manifest's `.prev`, what a
        damaged snapshot is recovered from)."""
        out = self.out(tmp_path)
        out.replace("snap", b"one")
        out.replace("snap", b"two", keep="snap.prev")
        assert out.read("snap") == b"two" and out.read("snap.prev") == b"one"

    def test_a_second_holder_of_the_lock_is_refused_until_it_is_released(self, tmp_path, monkeypatch):
        """Catches two runs writing one output at once: the second must be refused by name
        while the first holds the lock, and get it once the first is done."""
        monkeypatch.setenv("DIST_SVC_LOCK_LEASE", "1")
        where = self.make(tmp_path)
        first, second = output_dir(where), output_dir(where)
        first.mkdir()
        assert first.lock_holder("run.lock") is None
        with first.exclusive("run.lock") as check:
            check()
            assert second.lock_holder("run.lock").alive
            with pytest.raises(DistSvcError, match="another dist-svc run"):
                with second.exclusive("run.lock"):
                    pass
        held = second.lock_holder("run.lock")
        assert held is None or not held.alive
        with second.exclusive("run.lock"):
            pass

    def test_a_lock_left_by_a_run_that_died_is_taken_over(self, tmp_path, monkeypatch):
        """Catches a lock that outlives its run (every later run of that output refused)."""
        monkeypatch.setenv("DIST_SVC_LOCK_LEASE", "1")
        out = self.out(tmp_path)
        out.write("run.lock", b"host:1:dead 0 1")  # what a killed run leaves: its lock, never renewed
        time.sleep(2.1)  # past its lease of 1 s (a service's clock counts whole seconds)
        assert not out.lock_holder("run.lock").alive
        with out.exclusive("run.lock") as check:
            check()

    def test_conditional_puts_refuse_what_the_caller_did_not_see(self, tmp_path):
        """Catches a create that overwrites, and a replace that succeeds on a version the caller
        never saw: what keeps a second writer out where no lock dies with its process."""
        out = self.out(tmp_path)
        if not out.conditional_put:
            pytest.skip("no conditional puts here (one writer is kept by a lock that dies with its process)")
        etag = out.create("c", b"first")
        assert etag and out.create("c", b"second") is None and out.read("c") == b"first"
        assert out.replace_if("c", b"third", '"not-its-etag"') is None and out.read("c") == b"first"
        newer = out.replace_if("c", b"third", etag)
        assert newer and newer != etag and out.read("c") == b"third"
        assert out.replace_if("c", b"fourth", etag) is None

    def test_an_assembled_file_appears_whole_or_not_at_all(self, tmp_path):
        """Catches an assembly that leaves a partial object when it fails midway, parts out of
        order or bytes lost where ranges of other files of every size meet bytes and each other
        (parts copied inside the service, topped up, gathered), and a streamed upload that
        appears before it is closed."""
        out = self.out(tmp_path)
        if not out.multipart_assembly:
            pytest.skip("files are written in place here (write_at_offset), never assembled")
        pieces = [bytes([k]) * (3 << 20) for k in range(1, 8)]  # 21 MiB: more than one part
        out.assemble("whole", iter(pieces))
        assert out.read("whole") == b"".join(pieces)

        def failing():
            yield pieces[0] * 7
            raise RuntimeError("the producer failed")

        # ranges of other files, of every size around a part's 5 MiB, after bytes and after each other
        MiB = 1 << 20
        sources = {f"src/{k}": bytes(np.random.default_rng(k).integers(0, 256, size, dtype=np.uint8))
                   for k, size in enumerate([MiB // 3, 4 * MiB, 5 * MiB, 5 * MiB + 7, 9 * MiB + 1, 11 * MiB, 4096])}
        for source, data in sources.items():
            out.write(source, data)
        names = list(sources)
        mixed = [b"header", (names[4], 0, len(sources[names[4]])), (names[1], 0, 4 * MiB), (names[3], 3, 5 * MiB + 7),
                 (names[6], 0, 4096), (names[5], 0, 11 * MiB), (names[0], 10, 200), b"tail", (names[2], 0, 5 * MiB),
                 (names[6], 0, 4096), (names[4], MiB, 9 * MiB + 1)]
        out.assemble("mixed", iter(mixed))
        expected = b"".join(p if isinstance(p, bytes) else sources[p[0]][p[1]:p[2]] for p in mixed)
        assert out.read("mixed") == expected

        with pytest.raises(RuntimeError):
            out.assemble("broken", failing())
        assert out.size("broken") is None
        out.abort_uploads(["broken"])  # nothing of it left to abort: no error either
        writer = out.writer("streamed")
        writer.write(pieces[1])
        assert out.size("streamed") is None  # not before it is closed
        writer.close()
        assert out.read("streamed") == pieces[1]

    def test_write_at_offset_writes_in_place_from_another_handle(self, tmp_path):
        """Catches a directory that claims positional writes but whose files do not take them
        (shards are written in place by workers in other processes)."""
        out = self.out(tmp_path)
        if not out.write_at_offset:
            pytest.skip("every file is written once, whole, here")
        out.write("pre-sized", bytes(64))
        with open(out.path / "pre-sized", "r+b") as f:
            f.seek(10)
            f.write(b"abc")
        assert out.read_range("pre-sized", 8, 15) == b"\0\0abc\0\0"

    def test_an_output_dir_travels_to_another_process(self, tmp_path):
        """Catches an output directory that cannot be pickled (Ray actors write through it)."""
        out = self.out(tmp_path)
        out.write("f", b"data")
        again = pickle.loads(pickle.dumps(out))
        assert again.read("f") == b"data" and again.url == out.url
