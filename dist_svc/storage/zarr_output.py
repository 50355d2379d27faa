"""Output as a zarr v3 store: one array per tensor, each written whole chunks at a time.

The group and every array's metadata are created before any worker writes; a worker writes its
tensor's array (one writer per tensor, so concurrent workers in any process never share a
chunk) and fsyncs its files before it reports. The store may be a local directory or a prefix on
object storage (an s3:// OUT_DIR, through zarr's fsspec store): there every chunk is one object,
put whole by the worker that computed its tensor, so actors on nodes that share no filesystem
write one store together. There are no shards to seal: a resume re-hashes
the tensors an earlier run recorded and redoes the ones that differ. The store's format is in
dist_svc.storage.zarr_format.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import ClassVar, Iterable, Mapping, Sequence

import numpy as np

from dist_svc.storage.checksum import Hasher
from dist_svc.storage.outdir import output_dir
from dist_svc.storage.output import Entry, side_file_problems
from dist_svc.storage.zarr_format import (
    CHECKSUM_ATTR, DTYPE_ATTR, ORDER_ATTR, STORED, array_name, chunk_shape, zarr_module,
)


def create_group(store, order: list[str]) -> None:
    """The root group of an output store (kept if it exists), with the tensors' order. `store`:
    a local path, or a zarr store (`OutputDir.zarr_store`)."""
    group = zarr_module().open_group(store=store, mode="a", zarr_format=3)
    if group.attrs.get(ORDER_ATTR) != order:
        group.attrs[ORDER_ATTR] = order


def create_array(store, name: str, shape: tuple[int, ...], dtype: str, compression: str = "none") -> None:
    """The metadata of array `name` (an `array_name`) for a tensor (replaced if it exists with
    other metadata)."""
    zarr = zarr_module()
    stored, attr = STORED[dtype]
    chunks = chunk_shape(shape, dtype)
    compressors = None
    if compression == "zstd":
        from zarr.codecs import ZstdCodec

        compressors = [ZstdCodec(level=3)]
    try:
        existing = zarr.open_array(store=store, path=name, mode="r")
    except Exception:  # none yet (zarr's error types for "absent" vary by version)
        existing = None
    if (existing is not None and tuple(existing.shape) == tuple(shape) and str(existing.dtype) == stored
            and tuple(existing.chunks) == chunks and existing.attrs.get(DTYPE_ATTR) == attr):
        return
    zarr.create_array(store=store, name=name, shape=shape, chunks=chunks, dtype=stored,
                      compressors=compressors, fill_value=0, attributes={DTYPE_ATTR: attr},
                      overwrite=True, zarr_format=3)


class ZarrTensorWriter:
    """One tensor's bytes, in row order, into its array (`name`, an `array_name`): whole chunks
    at a time, so a chunk is never read back or written twice; the checksum of all bytes, as the
    safetensors writer computes it; or, for a matrix, ranges of its columns in any order
    (`write_columns`), hashed when complete by reading the array back. Its files are fsynced at
    close."""

    columns = True

    def __init__(self, out, name: str, shape: tuple[int, ...], dtype: str):
        self.out = out  # an OutputDir
        self.name = name
        self.shape = shape
        self.stored = np.dtype(STORED[dtype][0])
        # Every chunk is written, zeros too (a counter at 0, a mask's empty tile): a complete
        # store has every chunk file, which is how a missing one is told from zeros. The setting
        # is the opened array's own (zarr does not keep it in the metadata).
        self.array = zarr_module().open_array(store=out.zarr_store(), path=name, mode="r+").with_config(
            {"write_empty_chunks": True})
        self.row_bytes = (math.prod(shape[1:]) if shape else 1) * self.stored.itemsize
        self.rows_per_chunk = self.array.chunks[0] if shape else 1
        self.total_rows = shape[0] if shape else 1
        self.next_row = 0
        self.buffer = bytearray()
        self.hash = Hasher()
        self.columns_written = 0
        self.seconds = {"checksum": 0.0, "write": 0.0}

    def write_columns(self, start: int, stop: int, data) -> None:
        rows = self.shape[0]
        values = np.frombuffer(memoryview(data).cast("B"), dtype=self.stored).reshape(rows, stop - start)
        self.array[:, start:stop] = values
        self.columns_written += stop - start

    def write(self, data) -> None:
        start = time.perf_counter()
        data = memoryview(data).cast("B")
        self.hash.update(data)
        hashed = time.perf_counter()
        self.seconds["checksum"] += hashed - start
        self.buffer += data
        chunk_bytes = self.rows_per_chunk * self.row_bytes
        while len(self.buffer) >= chunk_bytes or (self.buffer and self._rows_buffered() + self.next_row
                                                   >= self.total_rows):
            take = min(len(self.buffer), chunk_bytes)
            self._flush(bytes(self.buffer[:take]))
            del self.buffer[:take]
        self.seconds["write"] += time.perf_counter() - hashed

    def _rows_buffered(self) -> int:
        return len(self.buffer) // max(self.row_bytes, 1)

    def _flush(self, raw: bytes) -> None:
        rows = len(raw) // max(self.row_bytes, 1)
        values = np.frombuffer(raw, dtype=self.stored)
        if not self.shape:
            self.array[()] = values[0]
        else:
            self.array[self.next_row:self.next_row + rows] = values.reshape(rows, *self.shape[1:])
        self.next_row += rows

    def close(self) -> str:
        if self.columns_written:  # written out of order: hashed as stored, in order
            if self.columns_written != self.shape[1] or self.next_row:
                raise RuntimeError(f"tensor '{self.name}': {self.columns_written} of {self.shape[1]} columns written")
            self.out.sync(self.name)
            digest = array_checksum(self.out.zarr_store(read_only=True), self.name)
            if digest is None:
                raise RuntimeError(f"tensor '{self.name}': cannot be read back")
            return digest
        expected = self.total_rows if self.shape else 1
        if self.buffer or self.next_row != expected:
            raise RuntimeError(f"tensor '{self.name}': {self.next_row} of {expected} rows written")
        self.out.sync(self.name)
        return self.hash.digest()

    def abort(self) -> None:
        self.buffer.clear()


def array_checksum(store, name: str, block_bytes: int = 64 << 20) -> str | None:
    """The checksum of one stored tensor's bytes in row order (None when it cannot be read); `name`
    is its `array_name`."""
    try:
        array = zarr_module().open_array(store=store, path=name, mode="r")
        digest = Hasher()
        if not array.shape:
            digest.update(np.ascontiguousarray(array[()]).tobytes())
            return digest.digest()
        row_bytes = max(1, math.prod(array.shape[1:]) * array.dtype.itemsize)
        step = max(array.chunks[0], block_bytes // row_bytes // array.chunks[0] * array.chunks[0])
        for r0 in range(0, array.shape[0], step):
            digest.update(np.ascontiguousarray(array[r0:r0 + step]).tobytes())
        return digest.digest()
    except Exception:
        return None


class ZarrLayout:
    format: ClassVar[str] = "zarr"

    def __init__(self, out_dir: Path | str, entries: Sequence[Entry], options: Mapping):
        self.out = output_dir(out_dir)
        self.out_dir = self.out.named
        # tensor -> (array name, dtype, shape); an impossible name is refused here, before writing
        self.entries = {name: (array_name(name), dtype, tuple(shape)) for name, dtype, shape in entries}
        self.compression = options.get("compression") or "none"

    def prepare(self, recorded: Mapping[str, str]) -> list[str]:
        store = self.out.zarr_store()
        create_group(store, list(self.entries))
        for array, dtype, shape in self.entries.values():
            create_array(store, array, shape, dtype, self.compression)
        return [name for name, digest in recorded.items() if self.stored_checksum(name) != digest]

    def writer(self, name: str, sync: bool) -> ZarrTensorWriter:
        array, dtype, shape = self.entries[name]
        return ZarrTensorWriter(self.out, array, shape, dtype)  # always syncs its own files

    def make_durable(self, names: Iterable[str]) -> None:
        pass  # writers sync at close

    def stored_checksum(self, name: str) -> str | None:
        return array_checksum(self.out.zarr_store(read_only=True), self.entries[name][0])

    def on_recorded(self, name: str) -> bool:
        return False

    def seal(self, recorded: Mapping[str, str], fresh: set[str]) -> list[str]:
        return []

    def finish(self, recorded: Mapping[str, str], side_files: Mapping[str, bytes]) -> None:
        """Each array records its tensor's checksum (a reader or `convert` can check the store
        on its own), then the side files."""
        for name, (array, _, _) in self.entries.items():
            meta = json.loads(self.out.read(f"{array}/zarr.json"))
            if meta.setdefault("attributes", {}).get(CHECKSUM_ATTR) != recorded[name]:
                meta["attributes"][CHECKSUM_ATTR] = recorded[name]
                self.out.write(f"{array}/zarr.json", json.dumps(meta, indent=2).encode())
        for name, data in side_files.items():
            self.out.write(name, data)
        self.out.sync("zarr.json")

    def problems(self, recorded: Mapping[str, str], side_files: Mapping[str, str], deep: bool) -> list[str]:
        out = []
        if self.out.size("zarr.json") is None:
            return [f"{self.out.where('zarr.json')}: missing (not a zarr store)"]
        zarr = zarr_module()
        store = self.out.zarr_store(read_only=True)
        chunks = self._chunk_counts()
        for name, (array, _, _) in self.entries.items():
            where = self.out.where(array)
            try:
                expected = zarr.open_array(store=store, path=array, mode="r").nchunks
            except Exception:
                out.append(f"{where}: tensor '{name}' is missing")
                continue
            count = chunks(array)
            if count < expected:
                out.append(f"{where}: tensor '{name}' has {count} of its {expected} chunk files")
            elif deep and (name not in recorded or self.stored_checksum(name) != recorded[name]):
                out.append(f"{where}: tensor '{name}' does not match its checksum (corrupted or not merged)")
        return out + side_file_problems(self.out, side_files, deep)

    def stamps(self, side_files: Iterable[str]) -> dict[str, str]:
        """One stamp for the whole store: a digest of its metadata, the side files and every
        array's chunk files: where versions are ordered (modification times), each array's
        chunk count, bytes and newest version; else (ETags) each chunk's size and version."""
        digest = hashlib.sha256()
        names = ["zarr.json", *side_files, *(f"{array}/zarr.json" for array, _, _ in self.entries.values())]
        if self.out.ordered_versions:
            for name in names:
                digest.update(f"{name}={self.out.stamp(name)}\n".encode())
            for array, _, _ in self.entries.values():
                chunks = [(size, version) for _, size, version in self.out.walk(f"{array}/c")]
                summary = (len(chunks), sum(c[0] for c in chunks), max((c[1] for c in chunks), default=0))
                digest.update(f"{array}={summary}\n".encode())
        else:
            wanted = set(names)
            for key, size, version in self.out.walk(""):
                array, sep, rest = key.partition("/")
                if key in wanted or (sep and (rest == "c" or rest.startswith("c/"))):
                    digest.update(f"{key}={size}:{version}\n".encode())
        return {"store": digest.hexdigest()}

    def damaged(self, recorded: Mapping[str, str], changed: Iterable[str]) -> list[str]:
        return []  # `prepare` re-hashes every recorded tensor anyway

    def _chunk_counts(self):
        """array -> its chunk files (one listing of the whole store)."""
        counts: dict[str, int] = {}
        for key, _, _ in self.out.walk(""):
            array, sep, rest = key.partition("/")
            if sep and (rest == "c" or rest.startswith("c/")):
                counts[array] = counts.get(array, 0) + 1
        return lambda array: counts.get(array, 0)

    def state(self) -> list[str]:
        return []
