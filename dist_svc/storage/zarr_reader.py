"""Reading zarr v3 stores as checkpoints: one array per tensor, read in row or column slices.

`ZarrCheckpoint` implements `Checkpoint` (dist_svc.storage.types): tensors from metadata alone,
`read(name, rows, cols)` reading only the chunks the slice covers, and an identity for the
fingerprint. The store's layout is described in dist_svc.storage.zarr_format.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dist_svc.errors import DistSvcError
from dist_svc.storage.types import TensorInfo, natural_key
from dist_svc.storage.zarr_format import (
    DTYPE_ATTR, FROM_ATTR, FROM_NUMPY, ORDER_ATTR, STORED, chunk_files, zarr_module,
)


@dataclass(frozen=True)
class _Array:
    info: TensorInfo
    array: object  # zarr.Array
    bf16: bool


class ZarrCheckpoint:
    """One checkpoint stored as a zarr v3 group in a local directory."""

    def __init__(self, path: str | Path):
        self.source = str(path)
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise DistSvcError(f"{self.path}: no zarr v3 store here (no zarr.json). Convert a safetensors "
                               f"checkpoint with `dist-svc convert SRC {self.path}`, or check the path.")
        try:
            group = zarr_module().open_group(store=str(self.path), mode="r")
            members = dict(group.arrays())
            recorded = group.attrs.get(ORDER_ATTR)
        except Exception as e:  # zarr raises many kinds for a store it cannot parse
            raise DistSvcError(f"{self.path}: cannot open as a zarr v3 group ({type(e).__name__}: {e}). "
                               f"Check the path, or convert the checkpoint again.") from None
        self.tensors: dict[str, TensorInfo] = {}
        self._arrays: dict[str, _Array] = {}
        order = [n for n in recorded if n in members] if isinstance(recorded, list) else []
        order += sorted((n for n in members if n not in set(order)), key=natural_key)
        self._order = order
        for name in order:
            array = members[name]
            attr = array.attrs.get(DTYPE_ATTR)
            stored = str(array.dtype)
            code = FROM_ATTR.get(attr) if attr is not None else FROM_NUMPY.get(stored)
            if code is None or STORED[code][0] != stored:
                raise DistSvcError(f"{self.path}: tensor '{name}' is stored as {stored}"
                                   f"{f' with {DTYPE_ATTR} {attr!r}' if attr else ''}, which dist-svc cannot "
                                   f"merge (supported: float64, float32, float16, and bfloat16 as uint16 with "
                                   f"{DTYPE_ATTR}: bfloat16). Convert it, or remove it from the store.")
            info = TensorInfo(name, code, tuple(int(d) for d in array.shape), str(self.path / name))
            self.tensors[name] = info
            self._arrays[name] = _Array(info, array, code == "BF16")
        if not self.tensors:
            raise DistSvcError(f"{self.path}: the zarr group holds no arrays; is this a checkpoint?")
        self._identity: list[dict] | None = None  # taken by the planner only (workers need none)

    def _take_identity(self) -> list[dict]:
        """Per array: its metadata's hash, its chunk files' count, total size and newest
        modification time. A store dist-svc wrote must have every chunk: a missing one (zarr
        would read it as zeros) is refused here, before anything is merged."""
        out = []
        for name, entry in self._arrays.items():
            root = self.path / name
            count, size, newest = chunk_files(root)
            expected = entry.array.nchunks
            if DTYPE_ATTR in entry.array.attrs and count < expected:
                raise DistSvcError(f"{self.path}: tensor '{name}' has {count} of its {expected} chunk files; "
                                   f"the store is incomplete (an interrupted copy?). Convert or copy it again.")
            out.append({"array": name, "shape": list(entry.info.shape), "dtype": entry.info.dtype,
                        "metadata_sha256": hashlib.sha256((root / "zarr.json").read_bytes()).hexdigest(),
                        "size": size, "mtime_ns": newest, "chunks": count})
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
        try:
            data = np.array(entry.array[selection], order="C", copy=True)  # 0-d stays 0-d
        except Exception as e:
            raise DistSvcError(f"{self.path}: cannot read tensor '{name}' ({type(e).__name__}: {e}); "
                               f"a chunk is corrupt or truncated. Convert or copy the store again.") from None
        tensor = torch.from_numpy(data)
        return tensor.view(torch.bfloat16) if entry.bf16 else tensor

    def side_file(self, name: str) -> bytes | None:
        path = self.path / name
        return path.read_bytes() if path.is_file() else None

    def close(self) -> None:
        pass
