"""What dist-svc's zarr v3 stores look like, shared by the reader and the output layout.

A store is a zarr v3 group (a local directory, by convention `*.zarr`) with one array per
tensor, named by the tensor's name. Every dtype is stored natively (integer and bool buffers
too) but bfloat16, which zarr lacks: bf16 tensors are stored as their raw bits (uint16) with the
attribute `dist_svc.dtype: bfloat16`; every array dist-svc writes names its dtype in that
attribute. Matrices are chunked in TILE x TILE tiles, other tensors in whole rows
of about CHUNK_BYTES. The non-tensor files of a checkpoint (config.json, tokenizer, ...) and a
merge's manifest sit next to the group's `zarr.json`; zarr ignores them.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from urllib.parse import unquote

from dist_svc.errors import DistSvcError
from dist_svc.storage.types import ITEMSIZE, SIDE_FILES, ST_TO_NAME

# config.json, the tokenizer and the manifest live next to the arrays; zarr need not say so.
warnings.filterwarnings("ignore", message=r"Object at .* is not recognized as a component of a Zarr hierarchy")

DTYPE_ATTR = "dist_svc.dtype"
ORDER_ATTR = "dist_svc.tensor_order"  # group attribute: the source checkpoint's tensor order
CHUNK_BYTES = 16 << 20
TILE = 2048  # a matrix chunk: 2048 x 2048 elements (8 MiB in bf16, 16 MiB in float32)
CONCURRENCY = 4  # chunks zarr decodes at once: bounds a read's memory to a few chunks
# safetensors dtype code -> (numpy dtype stored, name in DTYPE_ATTR): each natively but bfloat16
STORED = {code: ("uint16" if code == "BF16" else name, name) for code, name in ST_TO_NAME.items()}
FROM_ATTR = {attr: code for code, (_, attr) in STORED.items()}
FROM_NUMPY = {stored: code for code, (stored, _) in STORED.items() if code != "BF16"}
CHECKSUM_ATTR = "dist_svc.checksum"  # array attribute: the tensor's checksum, set once the store is complete
SHA_ATTR = "dist_svc.sha256"  # the same, as stores written before BLAKE3 recorded it (hex, no prefix)
MAX_NAME_BYTES = 255  # a file name's limit on common filesystems
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def array_name(tensor: str) -> str:
    """The array (a directory) holding a tensor: the name itself when it is a plain file name,
    else percent-encoded, so that every tensor name round-trips exactly: `params/dense/kernel`
    (a Flax name) is one array `params%2Fdense%2Fkernel`, not nested groups; `a.weight` and
    `a.weight/` stay two arrays. A name that would be hidden, reserved by zarr (`..`, `__x`), or
    collide with the store's own files (zarr.json, config.json, the manifest, ...) gets its first
    character encoded too. Refused (before anything is written) when the result is longer than a
    file name may be."""
    if not tensor:
        raise DistSvcError("a tensor with an empty name cannot be stored in a zarr store; write safetensors output.")
    out = "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in tensor)
    if out.startswith((".", "__")) or out in SIDE_FILES or out.endswith(".json"):
        out = f"%{ord(out[0]):02X}" + out[1:]
    if len(out.encode()) > MAX_NAME_BYTES:
        raise DistSvcError(f"tensor name {tensor[:60]!r}... is too long for a zarr store ({len(out.encode())} bytes "
                           f"as a file name, the limit is {MAX_NAME_BYTES}); write safetensors output instead.")
    return out


def tensor_name(array_path: str) -> str:
    """The tensor an array holds: `array_name` undone; a nested array (a store written by another
    tool, e.g. Flax's `params/dense/kernel` as groups) is named by its path."""
    return "/".join(unquote(part, errors="strict") for part in array_path.split("/"))


def is_zarr(path: str | Path) -> bool:
    """A zarr store: a name ending in .zarr, or a directory with a zarr.json."""
    text = str(path).rstrip("/")
    return text.endswith(".zarr") or (Path(text) / "zarr.json").is_file()


def zarr_module():
    import zarr

    if zarr.config.get("async.concurrency") != CONCURRENCY:
        zarr.config.set({"async.concurrency": CONCURRENCY})
    return zarr


def chunk_shape(shape: tuple[int, ...], dtype: str) -> tuple[int, ...]:
    """Tiles for matrices, whole rows of about CHUNK_BYTES for everything else."""
    if not shape:
        return ()
    if len(shape) == 2:
        return (max(1, min(shape[0], TILE)), max(1, min(shape[1], TILE)))
    row_bytes = math.prod(shape[1:]) * ITEMSIZE[dtype]
    return (max(1, min(shape[0], CHUNK_BYTES // max(row_bytes, 1))), *shape[1:])
