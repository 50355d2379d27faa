"""Reading zarr v3 stores as checkpoints: one array per tensor, read in row or column slices.

`ZarrCheckpoint` implements `Checkpoint` (dist_svc.storage.types): tensors from metadata alone,
`read(name, rows, cols)` reading only the chunks the slice covers, and an identity for the
fingerprint. The store may be a local directory or a prefix on object storage
(dist_svc.storage.location), which zarr reads through its own fsspec store. The store's layout
is described in dist_svc.storage.zarr_format.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dist_svc.errors import DistSvcError
from dist_svc.storage.checksum import is_digest
from dist_svc.storage.location import location, storage_errors
from dist_svc.storage.types import UNSUPPORTED, TensorInfo, natural_key
from dist_svc.storage.zarr_format import (
    CHECKSUM_ATTR, DTYPE_ATTR, FROM_ATTR, FROM_NUMPY, ORDER_ATTR, SHA_ATTR, STORED, tensor_name, zarr_module,
)


@dataclass(frozen=True)
class _Array:
    info: TensorInfo
    array: object  # zarr.Array
    key: str  # its directory in the store
    bf16: bool
    complete: bool  # written by dist-svc: every chunk file must exist (zarr reads a missing one as zeros)


class ZarrCheckpoint:
    """One checkpoint stored as a zarr v3 group, in a local directory or on object storage."""

    def __init__(self, path: str | Path, loc=None, source: str | None = None, extra_identity: dict | None = None):
        self.loc = loc if loc is not None else location(path)
        self.source = source or str(path)
        self.path = self.loc.path  # local stores only (None for remote ones)
        self._extra_identity = extra_identity
        self._chunk_keys: dict[str, set[str]] = {}  # remote stores: each array's chunk objects, listed once
        if not self.loc.is_file("zarr.json"):
            raise DistSvcError(f"{self.loc}: no zarr v3 store here (no zarr.json). Convert a safetensors "
                               f"checkpoint with `dist-svc convert SRC {self.loc}`, or check the path.")
        zarr = zarr_module()
        try:
            group = zarr.open_group(store=self.loc.zarr_store(), mode="r")
            members = {}
            for path, node in group.members(max_depth=None):  # nested groups too (Flax-style names)
                if isinstance(node, zarr.Array):
                    members[tensor_name(path)] = (path, node)
            recorded = group.attrs.get(ORDER_ATTR)
        except DistSvcError:
            raise
        except Exception as e:  # zarr raises many kinds for a store it cannot parse
            raise DistSvcError(f"{self.loc}: cannot open as a zarr v3 group ({type(e).__name__}: {str(e)[:200]}). "
                               f"Check the path, or convert the checkpoint again.") from None
        self.tensors: dict[str, TensorInfo] = {}
        self._arrays: dict[str, _Array] = {}
        self._order = self._ordered(members, recorded)
        for name in self._order:
            path, array = members[name]
            attr = array.attrs.get(DTYPE_ATTR)
            stored = str(array.dtype)
            code = FROM_ATTR.get(attr) if attr is not None else FROM_NUMPY.get(stored)
            if code is None or STORED[code][0] != stored:
                raise DistSvcError(f"{self.loc}: tensor '{name}' is stored as {stored}"
                                   f"{f' with {DTYPE_ATTR} {attr!r}' if attr else ''}, which dist-svc cannot "
                                   f"read ({UNSUPPORTED}; bfloat16 as uint16 with {DTYPE_ATTR}: bfloat16). "
                                   f"Convert it, or remove it from the store.")
            info = TensorInfo(name, code, tuple(int(d) for d in array.shape), self.loc.where(path))
            self.tensors[name] = info
            self._arrays[name] = _Array(info, array, path, code == "BF16", DTYPE_ATTR in array.attrs)
        if not self.tensors:
            raise DistSvcError(f"{self.loc}: the zarr group holds no arrays; is this a checkpoint?")
        self._identity: list[dict] | None = None  # taken by the planner only (workers need none)

    def _ordered(self, members: dict, recorded) -> list[str]:
        """The order the store records (`dist_svc.tensor_order`, written by dist-svc), then any
        other arrays in natural order. A recorded order that is not a list of distinct names of
        this store's arrays is a corrupt store (or one that lost arrays), refused."""
        recorded = [] if recorded is None else recorded
        problem = None
        if not isinstance(recorded, list) or not all(isinstance(n, str) for n in recorded):
            problem = "is not a list of tensor names"
        elif len(set(recorded)) != len(recorded):
            problem = f"names {next(n for n in recorded if recorded.count(n) > 1)[:80]!r} twice"
        elif not set(recorded) <= set(members):
            problem = f"names {next(n for n in recorded if n not in members)[:80]!r}, which the store lacks"
        if problem:
            raise DistSvcError(f"{self.loc}: the group attribute {ORDER_ATTR} {problem}; the store's metadata is "
                               f"corrupt or an array was removed. Convert the checkpoint again.")
        listed = set(recorded)
        return recorded + sorted((n for n in members if n not in listed), key=natural_key)

    def _take_identity(self) -> list[dict]:
        """Per array: its metadata's hash, its chunk files' count, total size and newest
        modification time (on object storage: a hash of the chunk objects' versions). A store
        dist-svc wrote must have every chunk: a missing one (zarr would read it as zeros) is
        refused here, before anything is merged."""
        out = [self._extra_identity] if self._extra_identity else []
        with storage_errors(self.loc, str(self.loc)):
            for name, entry in self._arrays.items():
                chunks = list(self.loc.walk(f"{entry.key}/c"))
                count, size = len(chunks), sum(c[1] for c in chunks)
                expected = entry.array.nchunks
                if entry.complete and count < expected:
                    raise DistSvcError(f"{self.loc}: tensor '{name}' has {count} of its {expected} chunk files; "
                                       f"the store is incomplete (an interrupted copy?). Convert or copy it again.")
                if self.loc.ordered_versions:  # the newest modification time says whether any changed
                    version = {"mtime_ns": max((c[2] for c in chunks), default=0)}
                else:  # opaque versions (ETags): every one counts
                    version = {"versions_sha256": hashlib.sha256(json.dumps(chunks).encode()).hexdigest()}
                meta = self.loc.read_bytes(f"{entry.key}/zarr.json") or b""
                out.append({"array": name, "shape": list(entry.info.shape), "dtype": entry.info.dtype,
                            "metadata_sha256": hashlib.sha256(meta).hexdigest(), "size": size, **version,
                            "chunks": count})
        return out

    def identity(self) -> list[dict]:
        if self._identity is None:
            self._identity = self._take_identity()
        return list(self._identity)

    def chunk_extent(self, name: str, axis: int) -> int:
        return int(self._arrays[name].array.chunks[axis])

    def order(self) -> list[str]:
        """Tensor names in the order of the checkpoint the store was converted from (else natural)."""
        return list(self._order)

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        entry = self._arrays[name]
        shape = entry.info.shape
        if not shape:
            selection = ()
        else:
            selection = (rows or slice(None),) + ((cols or slice(None),) if len(shape) > 1 else ())
        if entry.complete:
            self._check_chunks(entry, selection)
        try:
            data = np.array(entry.array[selection], order="C", copy=True)  # 0-d stays 0-d
        except DistSvcError:
            raise
        except Exception as e:
            problem = None if isinstance(e, (ValueError, TypeError)) else self.loc.problem(e, entry.info.where)
            if problem is not None:
                raise problem from None
            raise DistSvcError(f"{self.loc}: cannot read tensor '{name}' ({type(e).__name__}: {e}); "
                               f"a chunk is corrupt or truncated. Convert or copy the store again.") from None
        tensor = torch.from_numpy(data)
        return tensor.view(torch.bfloat16) if entry.bf16 else tensor

    def _check_chunks(self, entry: _Array, selection: tuple) -> None:
        """Every chunk file the selection covers exists: zarr would read a missing one as zeros."""
        import itertools

        array = entry.array
        ranges = []
        for axis, extent in enumerate(entry.info.shape):
            sel = selection[axis] if axis < len(selection) else slice(None)
            start, stop, _ = sel.indices(extent)
            if stop <= start:
                return  # nothing is read
            chunk = array.chunks[axis]
            ranges.append(range(start // chunk, (stop - 1) // chunk + 1))
        encode = array.metadata.chunk_key_encoding.encode_chunk_key
        if self.loc.cheap_lookups:
            def present(key: str) -> bool:
                return self.loc.is_file(f"{entry.key}/{key}")
        else:  # one listing of the array's chunks, looked up in
            if entry.key not in self._chunk_keys:
                with storage_errors(self.loc, entry.info.where):
                    self._chunk_keys[entry.key] = {f"c/{k}" if k else "c" for k, _, _ in self.loc.walk(f"{entry.key}/c")}
            keys = self._chunk_keys[entry.key]

            def present(key: str) -> bool:
                return key in keys
        for coords in itertools.product(*ranges):
            key = encode(tuple(coords))
            if not present(key):
                raise DistSvcError(f"{self.loc}: tensor '{entry.info.name}' is missing its chunk {key} "
                                   f"(zarr would read zeros there); the store is incomplete (an unfinished "
                                   f"merge or copy?). Finish or convert it again.")

    def checksum(self, name: str) -> str | None:
        """The checksum of the tensor's bytes (row-major) as the store records it when dist-svc
        completed it ("sha256:..." for stores written before BLAKE3); None for stores that
        record none."""
        attrs = self._arrays[name].array.attrs
        value = attrs.get(CHECKSUM_ATTR)
        if value is None and isinstance(attrs.get(SHA_ATTR), str):
            value = f"sha256:{attrs[SHA_ATTR]}"
        return value if is_digest(value) else None

    def side_file(self, name: str) -> bytes | None:
        return self.loc.read_bytes(name)

    def close(self) -> None:
        pass
