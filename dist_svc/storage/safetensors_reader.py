"""Reading Hugging Face safetensors checkpoints: headers checked up front, tensors streamed.

Tensor data is read with plain positional reads, not through safetensors' long-lived mmap (see
`SafetensorsCheckpoint.read`). A checkpoint is a directory holding `model.safetensors.index.json` + shards, a single
`model.safetensors`, or a set of `*.safetensors` files; a path to one `.safetensors` file works
too. Planning needs only the headers (names, shapes, dtypes), which are validated completely
before any merge starts: a truncated file, overlapping offsets or an unsupported dtype (an 8-bit
float, say) is reported with the file's name instead of surfacing as garbage halfway through a
long run.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import NamedTuple

import torch

from dist_svc.errors import DistSvcError
from dist_svc.storage.location import HEADER_PROBE, check_index, discover, location, side_file, storage_errors
from dist_svc.storage.location import quote as _quote
from dist_svc.storage.types import DTYPES, INDEX_NAME, ITEMSIZE, UNSUPPORTED, TensorInfo, natural_key

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class _Stored(NamedTuple):
    """Where a tensor's bytes are: its file (`LocalFile` or `RemoteFile`) and the offset of its
    first byte."""

    file: object
    offset: int


# Shapes beyond these are not tensors anyone stores; refusing them keeps a crafted header from
# making the planner or a worker loop over absurd extents (a [0, 2**62] tensor holds no bytes).
MAX_DIM = 1 << 40
MAX_RANK = 16
# Every dtype safetensors knows: a tensor of one of these that dist-svc cannot handle (the
# 4-, 6- and 8-bit floats, complex) is named as unsupported; anything else is a corrupt header.
SAFETENSORS_DTYPES = set(ITEMSIZE) | {"F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64"}


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
            raise DistSvcError(f"{where}: tensor {_quote(name)} has dtype {dtype}, which dist-svc cannot read "
                               f"({UNSUPPORTED}). Remove it from the checkpoint or convert it.")
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


def read_header(file, parse: bool = True) -> tuple[dict[str, Entry], int, dict]:
    """The validated tensors of one safetensors file (a `LocalFile` or `RemoteFile`; none unless
    `parse`), the offset of its data, and what identifies the file cheaply (see
    `SafetensorsCheckpoint.identity`). A remote file costs one request when the header fits in
    HEADER_PROBE bytes."""
    try:
        size = file.size
        if size < 8:
            raise DistSvcError(f"{file.where}: not a safetensors file (only {size} bytes). Re-download or re-save it.")
        probe = file.read(0, min(size, HEADER_PROBE))
        (n,) = struct.unpack("<Q", probe[:8])
        if n > MAX_HEADER or 8 + n > size:
            raise DistSvcError(f"{file.where}: invalid safetensors header length {n} for a file of {size} bytes; "
                               f"the file is truncated or not safetensors. Re-download or re-save it.")
        raw = probe[8:8 + n] if 8 + n <= len(probe) else probe[8:] + file.read(len(probe), 8 + n - len(probe))
    except OSError as e:
        raise DistSvcError(f"cannot read {file.where}: {e.strerror or e}.") from None
    entries = parse_header(raw, size - 8 - n, file.where) if parse else {}
    identity = {**file.identity(), "header_sha256": hashlib.sha256(raw).hexdigest()}
    return entries, 8 + n, identity


class SafetensorsCheckpoint:
    """One checkpoint: its tensors (from headers alone) and row-slice reads of each, wherever its
    files are (`dist_svc.storage.location`): local files by positional reads, objects by ranged
    reads of just the bytes asked for."""

    def __init__(self, path: str | Path, loc=None, source: str | None = None, extra_identity: dict | None = None,
                 identity_only: bool = False):
        """`identity_only`: read the headers for `identity()` (and the side files), without
        parsing them: what a rerun checks before it says "already complete"."""
        self.loc = loc if loc is not None else location(path)
        self.source = source or str(path)
        self.path = self.loc.path  # local checkpoints only (None for remote ones)
        names, weight_map = discover(self.loc, INDEX_NAME, "model.safetensors", (".safetensors",), "safetensors")
        self.files = [self.loc.file(n) for n in names]
        self.tensors: dict[str, TensorInfo] = {}
        self._stored: dict[str, _Stored] = {}
        self._identity = [extra_identity] if extra_identity else []
        if identity_only:
            with storage_errors(self.loc, str(self.loc)):
                self._identity += [read_header(file, parse=False)[2] for file in self.files]
            return
        with storage_errors(self.loc, str(self.loc)):
            for file in self.files:
                entries, data_start, identity = read_header(file)
                self._identity.append(identity)
                for name, entry in entries.items():
                    if name in self.tensors:
                        raise DistSvcError(f"{self.loc}: tensor {_quote(name)} is stored twice "
                                           f"({self._stored[name].file.name} and {file.name}).")
                    self.tensors[name] = TensorInfo(name, entry.dtype, entry.shape, file.where)
                    self._stored[name] = _Stored(file, data_start + entry.begin)
        check_index(weight_map, {n: s.file.name for n, s in self._stored.items()}, self.loc.where(INDEX_NAME))

    def chunk_extent(self, name: str, axis: int) -> int:
        """Any block of rows or columns is read without waste here (see `ZarrCheckpoint`)."""
        return 1

    def order(self) -> list[str]:
        """Tensor names file by file, in natural order within a file ("layers.10" after "layers.9")."""
        position = {id(file): i for i, file in enumerate(self.files)}
        return sorted(self.tensors, key=lambda n: (position[id(self._stored[n].file)], natural_key(n)))

    def identity(self) -> list[dict]:
        """What identifies the inputs cheaply: each file's name, size, modification time (an
        object's version on object storage) and header hash. Hashing every byte of a 70B model's
        inputs at each start is not affordable; a file rewritten in place gets a new modification
        time. Taken when the headers were read."""
        return list(self._identity)

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """The tensor, or a range of its rows and/or columns, in its stored dtype, in memory this
        call allocates; nothing else is read.

        Rows are one contiguous byte range, read straight into the tensor's buffer (`preadv`
        locally; concurrent ranged requests remotely). Columns are strided: locally they are
        copied out of short-lived mappings of at most MAP_WINDOW bytes, remotely out of a local
        scratch copy of the tensor. Either way no file pages stay mapped, so the process's memory
        grows by the slice read, not by the tensor or the amount of data read (a long-lived mmap
        would keep every page touched resident).
        """
        info = self.tensors[name]
        torch_dtype, itemsize = DTYPES[info.dtype]
        shape = info.shape
        stored = self._stored[name]
        try:
            with storage_errors(self.loc, info.where):
                if cols is not None:
                    return self._read_columns(info, stored, rows or slice(None), cols)
                if rows is None or not shape:
                    start, stop = 0, (shape[0] if shape else 1)
                else:
                    start, stop, step = rows.indices(shape[0])
                    if step != 1:
                        raise ValueError("row slices must have step 1")
                    stop = max(start, stop)
                row_bytes = math.prod(shape[1:]) * itemsize
                out = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)  # not zero-filled, unlike a bytearray
                stored.file.read_into(stored.offset + start * row_bytes, memoryview(out.numpy()))
            out_shape = ((stop - start), *shape[1:]) if shape else ()
            return out.view(torch_dtype).reshape(out_shape)
        except OSError as e:
            raise DistSvcError(f"{info.where}: cannot read tensor '{name}': {e.strerror or e}.") from None

    def _read_columns(self, info: TensorInfo, stored: _Stored, rows: slice, cols: slice) -> torch.Tensor:
        torch_dtype, itemsize = DTYPES[info.dtype]
        r0, r1, step = rows.indices(info.shape[0])
        if step != 1:
            raise ValueError("row slices must have step 1")
        c0, c1, cstep = cols.indices(info.shape[1])
        if cstep != 1:
            raise ValueError("column slices must have step 1")
        out = stored.file.read_columns(stored.offset, info.shape, itemsize, range(r0, max(r0, r1)),
                                       range(c0, max(c0, c1)))
        return torch.from_numpy(out).view(torch_dtype)

    def checksum(self, name: str) -> str | None:
        return None

    def side_file(self, name: str) -> bytes | None:
        return side_file(self.loc, name)

    def close(self) -> None:
        for file in self.files:
            file.close()

