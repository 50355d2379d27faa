"""Zarr v3 stores as checkpoints: one array per tensor, read in row or column slices.

A store is a zarr v3 group (a local directory, by convention `*.zarr`, or any URL zarr and
fsspec accept) whose arrays are named by tensor name. zarr has no bfloat16, so bf16 tensors are
stored as their raw bits (uint16) with the attribute `dist_svc.dtype: bfloat16`; every array
dist-svc writes carries that attribute, naming its dtype. Arrays are chunked by whole rows,
about CHUNK_BYTES per chunk, so that a row slice reads only the chunks it covers. The non-tensor
files of a Hugging Face checkpoint (config.json, tokenizer, ...) sit next to the group's
`zarr.json`; zarr ignores them.

`ZarrCheckpoint` has the interface of `SafetensorsCheckpoint` (tensors from metadata alone,
`read(name, rows, cols)`, `identity()`), so the planner and the workers take either.
`ZarrTensorWriter` has that of `TensorWriter`: bytes in row order in, whole chunks out, sha256 of
the bytes, files fsynced at close. Each tensor is written by exactly one writer (a unit is one
tensor), so concurrent workers, in one process or many, never share a chunk.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dist_svc.errors import DistSvcError
from dist_svc.storage.hf_output import fsync_dir, sync_file
from dist_svc.storage.safetensors_reader import DTYPES, TensorInfo, natural_key

# config.json, the tokenizer and the manifest live next to the arrays; zarr need not say so.
warnings.filterwarnings("ignore", message=r"Object at .* is not recognized as a component of a Zarr hierarchy")

DTYPE_ATTR = "dist_svc.dtype"
ORDER_ATTR = "dist_svc.tensor_order"  # group attribute: the source checkpoint's tensor order
CHUNK_BYTES = 16 << 20
TILE = 2048  # a matrix chunk: 2048 x 2048 elements (8 MiB in bf16, 16 MiB in float32)
CONCURRENCY = 4  # chunks zarr decodes at once: bounds a read's memory to a few chunks
# safetensors dtype code -> (numpy dtype stored, name in DTYPE_ATTR)
STORED = {"F64": ("float64", "float64"), "F32": ("float32", "float32"), "F16": ("float16", "float16"),
          "BF16": ("uint16", "bfloat16")}
_FROM_ATTR = {attr: code for code, (_, attr) in STORED.items()}
_FROM_NUMPY = {"float64": "F64", "float32": "F32", "float16": "F16"}
COMPRESSIONS = ("none", "zstd")


def is_zarr(path: str | Path) -> bool:
    """A zarr store: a name ending in .zarr, a URL, or a directory with a zarr.json."""
    text = str(path).rstrip("/")
    return text.endswith(".zarr") or "://" in text or (Path(text) / "zarr.json").is_file()


def _zarr():
    import zarr

    if zarr.config.get("async.concurrency") != CONCURRENCY:
        zarr.config.set({"async.concurrency": CONCURRENCY})
    return zarr


@dataclass(frozen=True)
class _Array:
    info: TensorInfo
    array: object  # zarr.Array
    bf16: bool


class ZarrCheckpoint:
    """One checkpoint stored as a zarr v3 group."""

    def __init__(self, path: str | Path):
        text = str(path)
        self.url = text if "://" in text else None
        self.path = Path(text) if self.url is None else Path(text.split("://", 1)[1])
        if self.url is None and not (self.path / "zarr.json").is_file():
            raise DistSvcError(f"{self.path}: no zarr v3 store here (no zarr.json). Convert a safetensors "
                               f"checkpoint with `dist-svc convert SRC {self.path}`, or check the path.")
        try:
            group = _zarr().open_group(store=self.url or str(self.path), mode="r")
            members = dict(group.arrays())
            recorded = group.attrs.get(ORDER_ATTR)
        except Exception as e:  # zarr raises many kinds for a store it cannot parse
            raise DistSvcError(f"{text}: cannot open as a zarr v3 group ({type(e).__name__}: {e}). "
                               f"Check the path, or convert the checkpoint again.") from None
        self.files = [self.path]
        self.tensors: dict[str, TensorInfo] = {}
        self._arrays: dict[str, _Array] = {}
        order = [n for n in recorded if n in members] if isinstance(recorded, list) else []
        order += sorted((n for n in members if n not in set(order)), key=natural_key)
        self._order = order
        for name in order:
            array = members[name]
            attr = array.attrs.get(DTYPE_ATTR)
            stored = str(array.dtype)
            code = _FROM_ATTR.get(attr) if attr is not None else _FROM_NUMPY.get(stored)
            if code is None or STORED[code][0] != stored:
                raise DistSvcError(f"{self.path}: tensor '{name}' is stored as {stored}"
                                   f"{f' with {DTYPE_ATTR} {attr!r}' if attr else ''}, which dist-svc cannot "
                                   f"merge (supported: float64, float32, float16, and bfloat16 as uint16 with "
                                   f"{DTYPE_ATTR}: bfloat16). Convert it, or remove it from the store.")
            info = TensorInfo(name, code, tuple(int(d) for d in array.shape), self.path, 0)
            self.tensors[name] = info
            self._arrays[name] = _Array(info, array, code == "BF16")
        if not self.tensors:
            raise DistSvcError(f"{text}: the zarr group holds no arrays; is this a checkpoint?")
        self._identity: list[dict] | None = None  # taken by the planner only (workers need none)

    def _take_identity(self) -> list[dict]:
        """Per array: its metadata's hash and, for a local store, its chunk files' total size and
        newest modification time. A store dist-svc wrote must have every chunk: a missing one
        (zarr would read it as zeros) is refused here, before anything is merged."""
        out = []
        for name, entry in self._arrays.items():
            item = {"array": name, "shape": list(entry.info.shape), "dtype": entry.info.dtype}
            if self.url is None:
                root = self.path / name
                meta = (root / "zarr.json").read_bytes()
                item["metadata_sha256"] = hashlib.sha256(meta).hexdigest()
                size, newest, count = 0, 0, 0
                for dirpath, _, filenames in os.walk(root / "c") if (root / "c").is_dir() else ():
                    for f in filenames:
                        st = os.stat(os.path.join(dirpath, f))
                        size, newest, count = size + st.st_size, max(newest, st.st_mtime_ns), count + 1
                if (root / "c").is_file():  # a 0-d array's single chunk
                    st = (root / "c").stat()
                    size, newest, count = st.st_size, st.st_mtime_ns, 1
                expected = entry.array.nchunks
                if DTYPE_ATTR in entry.array.attrs and count < expected:
                    raise DistSvcError(f"{self.path}: tensor '{name}' has {count} of its {expected} chunk files; "
                                       f"the store is incomplete (an interrupted copy?). Convert or copy it again.")
                item.update(size=size, mtime_ns=newest, chunks=count)
            out.append(item)
        return out

    def identity(self) -> list[dict]:
        if self._identity is None:
            self._identity = self._take_identity()
        return list(self._identity)

    def chunk_extent(self, name: str, axis: int) -> int:
        """Rows (axis 0) or columns (axis 1) per chunk: blocks aligned to it read each chunk once."""
        return int(self._arrays[name].array.chunks[axis])

    def order(self) -> list[str]:
        """Tensor names in the order of the checkpoint the store was converted from (else natural)."""
        return list(self._order)

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """The tensor, or a range of its rows and/or columns, in its stored dtype; only the chunks
        covering the slice are read."""
        entry = self._arrays[name]
        shape = entry.info.shape
        if not shape:
            selection = ()
        else:
            selection = (rows or slice(None),) + ((cols or slice(None),) if len(shape) > 1 else ())
        try:
            data = np.array(entry.array[selection], order="C", copy=True)  # 0-d stays 0-d
        except Exception as e:
            raise DistSvcError(f"{self.path}: cannot read tensor '{name}' ({type(e).__name__}: {e}); "
                               f"a chunk is corrupt or truncated. Convert or copy the store again.") from None
        tensor = torch.from_numpy(data)
        return tensor.view(torch.bfloat16) if entry.bf16 else tensor

    def close(self) -> None:
        pass


# -- writing -------------------------------------------------------------------------------------

def chunk_shape(shape: tuple[int, ...], dtype: str) -> tuple[int, ...]:
    """Tiles for matrices, whole rows of about CHUNK_BYTES for everything else."""
    if not shape:
        return ()
    if len(shape) == 2:
        return (max(1, min(shape[0], TILE)), max(1, min(shape[1], TILE)))
    row_bytes = math.prod(shape[1:]) * DTYPES[dtype][1]
    return (max(1, min(shape[0], CHUNK_BYTES // max(row_bytes, 1))), *shape[1:])


def create_group(path: Path, order: list[str] | None = None) -> None:
    """The root group of an output store (kept if it exists), with the tensors' order."""
    group = _zarr().open_group(store=str(path), mode="a", zarr_format=3)
    if order is not None and group.attrs.get(ORDER_ATTR) != order:
        group.attrs[ORDER_ATTR] = order


def create_array(path: Path, name: str, shape: tuple[int, ...], dtype: str, compression: str = "none") -> None:
    """The metadata of one tensor's array (replaced if it exists with other metadata)."""
    zarr = _zarr()
    stored, attr = STORED[dtype]
    chunks = chunk_shape(shape, dtype)
    compressors = None
    if compression == "zstd":
        from zarr.codecs import ZstdCodec

        compressors = [ZstdCodec(level=3)]
    try:
        existing = zarr.open_array(store=str(path), path=name, mode="r")
    except Exception:  # none yet (zarr's error types for "absent" vary by version)
        existing = None
    if (existing is not None and tuple(existing.shape) == tuple(shape) and str(existing.dtype) == stored
            and tuple(existing.chunks) == chunks and existing.attrs.get(DTYPE_ATTR) == attr):
        return
    zarr.create_array(store=str(path), name=name, shape=shape, chunks=chunks, dtype=stored,
                      compressors=compressors, fill_value=0, attributes={DTYPE_ATTR: attr},
                      config={"write_empty_chunks": True}, overwrite=True, zarr_format=3)


class ZarrTensorWriter:
    """One tensor's bytes, in row order, into its array: whole chunks at a time, so a chunk is
    never read back or written twice; sha256 of all bytes, as `TensorWriter` computes it."""

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], dtype: str, sync: bool = True):
        self.root = Path(path)
        self.name = name
        self.shape = shape
        self.stored = np.dtype(STORED[dtype][0])
        self.array = _zarr().open_array(store=str(self.root), path=name, mode="r+")
        self.row_bytes = (math.prod(shape[1:]) if shape else 1) * self.stored.itemsize
        self.rows_per_chunk = self.array.chunks[0] if shape else 1
        self.total_rows = shape[0] if shape else 1
        self.next_row = 0
        self.buffer = bytearray()
        self.hash = hashlib.sha256()
        self.sync = sync

    def write(self, data) -> None:
        data = memoryview(data).cast("B")
        self.hash.update(data)
        self.buffer += data
        chunk_bytes = self.rows_per_chunk * self.row_bytes
        while len(self.buffer) >= chunk_bytes or (self.buffer and self._rows_buffered() + self.next_row
                                                   >= self.total_rows):
            take = min(len(self.buffer), chunk_bytes)
            self._flush(bytes(self.buffer[:take]))
            del self.buffer[:take]

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
        expected = self.total_rows if self.shape else 1
        if self.buffer or self.next_row != expected:
            raise RuntimeError(f"tensor '{self.name}': {self.next_row} of {expected} rows written")
        if self.sync:
            sync_tree(self.root / self.name)
        return self.hash.hexdigest()

    def abort(self) -> None:
        self.buffer.clear()


def sync_tree(root: Path) -> None:
    """Make every file and directory under `root` durable (one array: its metadata and chunks)."""
    if root.is_file():
        sync_file(root)
        return
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            sync_file(Path(dirpath) / f)
        fsync_dir(Path(dirpath))


def array_sha256(path: Path, name: str, block_bytes: int = 64 << 20) -> str | None:
    """sha256 of one stored tensor's bytes in row order (None when it cannot be read)."""
    try:
        array = _zarr().open_array(store=str(path), path=name, mode="r")
        digest = hashlib.sha256()
        if not array.shape:
            digest.update(np.ascontiguousarray(array[()]).tobytes())
            return digest.hexdigest()
        row_bytes = max(1, math.prod(array.shape[1:]) * array.dtype.itemsize)
        step = max(array.chunks[0], block_bytes // row_bytes // array.chunks[0] * array.chunks[0])
        for r0 in range(0, array.shape[0], step):
            digest.update(np.ascontiguousarray(array[r0:r0 + step]).tobytes())
        return digest.hexdigest()
    except Exception:
        return None
