"""Reading Hugging Face safetensors checkpoints: headers checked up front, tensors streamed.

Tensor data is read with plain positional reads, not through safetensors' long-lived mmap (see
`SafetensorsCheckpoint.read`). A checkpoint is a directory holding `model.safetensors.index.json` + shards, a single
`model.safetensors`, or a set of `*.safetensors` files; a path to one `.safetensors` file works
too. Planning needs only the headers (names, shapes, dtypes), which are validated completely
before any merge starts: a truncated file, overlapping offsets or an unsupported dtype is reported
with the file's name instead of surfacing as garbage halfway through a long run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from dist_svc.errors import DistSvcError
from dist_svc.storage.types import DTYPES, INDEX_NAME, ITEMSIZE, TensorInfo, natural_key

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
MAP_WINDOW = 32 * 1024 * 1024  # bytes of a tensor mapped at once by a column read


class _Stored(NamedTuple):
    """Where a tensor's bytes are: its file and the offset of its first byte."""

    file: Path
    offset: int


# Shapes beyond these are not tensors anyone stores; refusing them keeps a crafted header from
# making the planner or a worker loop over absurd extents (a [0, 2**62] tensor holds no bytes).
MAX_DIM = 1 << 40
MAX_RANK = 16
# Every dtype safetensors knows: a tensor of one of these that dist-svc cannot merge is named as
# unsupported; anything else is a corrupt header.
SAFETENSORS_DTYPES = set(ITEMSIZE) | {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F8_E4M3",
                                    "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64"}


class Entry(NamedTuple):
    """One tensor as a safetensors header describes it (offsets relative to the data area)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def parse_header(raw: bytes, data_bytes: int, where: str) -> dict[str, Entry]:
    """Validate a safetensors JSON header completely (types, dtypes, shapes, offsets that tile the
    `data_bytes` of the data area exactly) and return its tensors. Any violation is a
    DistSvcError naming `where` and the tensor: nothing malformed reaches the planner."""
    def corrupt(problem: str) -> DistSvcError:
        return DistSvcError(f"{where}: {problem}; the file is corrupt or not safetensors. Re-download or re-save it.")

    try:
        header = json.loads(raw, parse_constant=_not_json)  # strict JSON, as safetensors reads it
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise corrupt("the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise corrupt("the safetensors header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt("its '__metadata__' is not a JSON object of strings")
    entries: dict[str, Entry] = {}
    spans = []
    for name, entry in header.items():  # a hot loop at tens of thousands of tensors: plain checks
        if name == "__metadata__":
            continue
        if type(entry) is not dict or "dtype" not in entry or "shape" not in entry or "data_offsets" not in entry:
            raise corrupt(f"tensor {_quote(name)} has a malformed header entry (expected dtype, shape, data_offsets)")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        itemsize = ITEMSIZE.get(dtype) if type(dtype) is str else None
        if itemsize is None:
            if type(dtype) is not str or dtype not in SAFETENSORS_DTYPES:
                raise corrupt(f"tensor {_quote(name)} has dtype {_quote(dtype)}, which safetensors does not define")
            raise DistSvcError(f"{where}: tensor {_quote(name)} has dtype {dtype}, which dist-svc cannot merge "
                               f"(supported: {', '.join(ITEMSIZE)}). Remove it from the checkpoint or convert it.")
        if type(shape) is not list or len(shape) > MAX_RANK:
            raise corrupt(f"tensor {_quote(name)} has shape {_quote(shape)}; expected a list of at most {MAX_RANK} "
                          f"integers from 0 to 2^40")
        count = 1
        for d in shape:
            if type(d) is not int or not 0 <= d <= MAX_DIM:
                raise corrupt(f"tensor {_quote(name)} has shape {_quote(shape)}; expected a list of at most "
                              f"{MAX_RANK} integers from 0 to 2^40")
            count *= d
        if type(offsets) is not list or len(offsets) != 2:
            raise corrupt(f"tensor {_quote(name)} has data_offsets {_quote(offsets)}; expected [begin, end] integers")
        begin, end = offsets
        if type(begin) is not int or type(end) is not int or not 0 <= begin <= end:
            raise corrupt(f"tensor {_quote(name)} has data_offsets {_quote(offsets)}; expected [begin, end] integers")
        if end - begin != count * itemsize:
            raise corrupt(f"tensor {_quote(name)} has offsets {begin}..{end} that do not match its shape {shape} "
                          f"and dtype {dtype}")
        entries[name] = Entry(dtype, tuple(shape), begin, end)
        spans.append((begin, end, name))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            problem = "overlaps the previous tensor" if begin < position else "leaves a gap before it"
            raise corrupt(f"tensor {_quote(name)} {problem} (offset {begin}, expected {position})")
        position = end
    if position != data_bytes:
        raise DistSvcError(f"{where}: the header describes {position} bytes of tensor data but the file has "
                           f"{data_bytes}; it is truncated or has trailing bytes. Re-download or re-save it.")
    return entries


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def _quote(value, limit: int = 80) -> str:
    """A value from a file, quoted for a message and cut short: crafted input must not be able
    to make an error message huge."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...(cut)"


def read_header(path: Path, parse: bool = True) -> tuple[dict[str, Entry], int, dict]:
    """The validated tensors of one safetensors file (none unless `parse`), the offset of its
    data, and what identifies the file cheaply (see `SafetensorsCheckpoint.identity`), from one
    open."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise DistSvcError(f"{path}: not a safetensors file (only {size} bytes). Re-download or re-save it.")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER or 8 + n > size:
                raise DistSvcError(f"{path}: invalid safetensors header length {n} for a file of {size} bytes; "
                                   f"the file is truncated or not safetensors. Re-download or re-save it.")
            raw = f.read(n)
    except OSError as e:
        raise DistSvcError(f"cannot read {path}: {e.strerror}.") from None
    entries = parse_header(raw, size - 8 - n, str(path)) if parse else {}
    identity = {"file": path.name, "size": size, "mtime_ns": st.st_mtime_ns,
                "header_sha256": hashlib.sha256(raw).hexdigest()}
    return entries, 8 + n, identity


def _weight_map(index: Path) -> dict[str, str]:
    """An index's tensor -> shard file map, each shard a plain file name beside the index."""
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise DistSvcError(f"{index}: not a valid index (expected a JSON object with 'weight_map').") from None
    if not isinstance(weight_map, dict):
        raise DistSvcError(f"{index}: 'weight_map' is {type(weight_map).__name__}, not a mapping of tensor names "
                           f"to shard files; the index is corrupt. Re-download or re-save the checkpoint.")
    for name, fname in weight_map.items():
        if not isinstance(fname, str) or not fname or "/" in fname or "\\" in fname or fname in (".", ".."):
            raise DistSvcError(f"{index}: tensor {_quote(name)} is mapped to {_quote(fname)}, which is not the "
                               f"name of a shard file beside the index; the index is corrupt.")
    return weight_map


class SafetensorsCheckpoint:
    """One checkpoint: its tensors (from headers alone) and row-slice reads of each."""

    def __init__(self, path: str | Path, identity_only: bool = False):
        """`identity_only`: read the headers for `identity()` (and the side files), without
        parsing them: what a rerun checks before it says "already complete"."""
        self.source = str(path)
        self.path = Path(path)
        self.files = self._discover()
        self.tensors: dict[str, TensorInfo] = {}
        self._stored: dict[str, _Stored] = {}
        self._identity = []
        self._fds: dict[Path, int] = {}
        self._fds_lock = threading.Lock()  # workers of one process share a checkpoint
        if identity_only:
            self._identity = [read_header(file, parse=False)[2] for file in self.files]
            return
        for file in self.files:
            entries, data_start, identity = read_header(file)
            self._identity.append(identity)
            for name, entry in entries.items():
                if name in self.tensors:
                    raise DistSvcError(f"{self.path}: tensor {_quote(name)} is stored twice "
                                       f"({self._stored[name].file.name} and {file.name}).")
                self.tensors[name] = TensorInfo(name, entry.dtype, entry.shape, str(file))
                self._stored[name] = _Stored(file, data_start + entry.begin)
        self._check_index()

    def _discover(self) -> list[Path]:
        p = self.path
        if p.is_file() and p.suffix == ".safetensors":
            return [p]
        if not p.is_dir():
            raise DistSvcError(f"{p}: no such checkpoint directory. dist-svc reads local checkpoints; "
                               f"download hub models first (e.g. `huggingface-cli download ID --local-dir DIR`).")
        index = p / INDEX_NAME
        if index.is_file():
            weight_map = _weight_map(index)
            self._weight_map = weight_map
            files = sorted({p / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise DistSvcError(f"{index} names shard {f.name}, which is missing from {p}.")
            return files
        self._weight_map = None
        single = p / "model.safetensors"
        if single.is_file():
            return [single]
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise DistSvcError(f"{p}: no safetensors files (expected {INDEX_NAME} with shards, or model.safetensors).")
        return files

    def _check_index(self) -> None:
        weight_map = getattr(self, "_weight_map", None)
        if weight_map is None:
            return
        for name, fname in weight_map.items():
            info = self.tensors.get(name)
            if info is None or self._stored[name].file.name != fname:
                raise DistSvcError(f"{self.path / INDEX_NAME}: tensor {_quote(name)} is mapped to {fname}, "
                                   f"but that file does not hold it. The index and shards disagree.")
        for name in self.tensors:
            if name not in weight_map:
                raise DistSvcError(f"{self.path / INDEX_NAME}: tensor {_quote(name)} is in "
                                   f"{self._stored[name].file.name} but not in the index.")

    def chunk_extent(self, name: str, axis: int) -> int:
        """Any block of rows or columns is read without waste here (see `ZarrCheckpoint`)."""
        return 1

    def order(self) -> list[str]:
        """Tensor names file by file, in natural order within a file ("layers.10" after "layers.9")."""
        position = {file: i for i, file in enumerate(self.files)}
        return sorted(self.tensors, key=lambda n: (position[self._stored[n].file], natural_key(n)))

    def identity(self) -> list[dict]:
        """What identifies the inputs cheaply: each file's name, size, modification time and
        header hash. Hashing every byte of a 70B model's inputs at each start is not affordable;
        a file rewritten in place gets a new modification time. Taken when the headers were read."""
        return list(self._identity)

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """The tensor, or a range of its rows and/or columns, in its stored dtype, in memory this
        call allocates; nothing else is read.

        Rows are one contiguous byte range, read with preadv straight into the tensor's buffer.
        Columns are strided: they are copied out of short-lived mappings of at most MAP_WINDOW
        bytes. Either way no file pages stay mapped, so the process's memory grows by the slice
        read, not by the tensor or the amount of data read (a long-lived mmap would keep every
        page touched resident).
        """
        info = self.tensors[name]
        torch_dtype, itemsize = DTYPES[info.dtype]
        shape = info.shape
        try:
            if cols is not None:
                return self._read_columns(info, self._stored[name], rows or slice(None), cols)
            if rows is None or not shape:
                start, stop = 0, (shape[0] if shape else 1)
            else:
                start, stop, step = rows.indices(shape[0])
                if step != 1:
                    raise ValueError("row slices must have step 1")
                stop = max(start, stop)
            row_bytes = math.prod(shape[1:]) * itemsize
            out = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)  # not zero-filled, unlike a bytearray
            stored = self._stored[name]
            self._pread(stored.file, stored.offset + start * row_bytes, memoryview(out.numpy()))
            out_shape = ((stop - start), *shape[1:]) if shape else ()
            return out.view(torch_dtype).reshape(out_shape)
        except OSError as e:
            raise DistSvcError(f"{info.where}: cannot read tensor '{name}': {e.strerror or e}.") from None

    def _pread(self, file: Path, offset: int, buf: memoryview) -> None:
        fd = self._fds.get(file)
        if fd is None:
            with self._fds_lock:
                fd = self._fds.get(file)
                if fd is None:
                    fd = self._fds[file] = os.open(file, os.O_RDONLY)
        view = memoryview(buf)
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise OSError(f"unexpected end of file at byte {offset + done}; the file was truncated")
            done += n

    def _read_columns(self, info: TensorInfo, stored: _Stored, rows: slice, cols: slice) -> torch.Tensor:
        """Strided reads: copied out of mappings of at most MAP_WINDOW bytes of whole rows at a
        time, each unmapped before the next, so the pages mapped at any moment stay bounded."""
        torch_dtype, itemsize = DTYPES[info.dtype]
        np_dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[itemsize]
        m = info.shape[0]
        row_bytes = math.prod(info.shape[1:]) * itemsize
        r0, r1, step = rows.indices(m)
        if step != 1:
            raise ValueError("row slices must have step 1")
        r1 = max(r0, r1)
        c0, c1, cstep = cols.indices(info.shape[1])
        if cstep != 1:
            raise ValueError("column slices must have step 1")
        out = np.empty((r1 - r0, max(c1 - c0, 0), *info.shape[2:]), dtype=np_dtype)
        per_window = max(1, MAP_WINDOW // max(row_bytes, 1))
        for start in range(r0, r1, per_window):
            stop = min(start + per_window, r1)
            window = np.memmap(stored.file, dtype=np_dtype, mode="r", offset=stored.offset + start * row_bytes,
                               shape=(stop - start, *info.shape[1:]))
            out[start - r0:stop - r0] = window[:, c0:c1]
            del window  # unmapped here
        return torch.from_numpy(out).view(torch_dtype)

    def checksum(self, name: str) -> str | None:
        return None

    def side_file(self, name: str) -> bytes | None:
        path = (self.path if self.path.is_dir() else self.path.parent) / name
        return path.read_bytes() if path.is_file() else None

    def close(self) -> None:
        with self._fds_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

