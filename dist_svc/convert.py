"""`dist-svc convert`: a checkpoint from one layout to the other (safetensors <-> zarr v3).

Tensors are streamed in row blocks (never a whole checkpoint in memory), hashed on the way in,
and every tensor is read back from the destination and compared with that hash before the
result appears: the output is built under a temporary name next to DST and renamed into place
at the end, so DST is either absent or complete, and an existing DST is never touched.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Callable

from dist_svc.errors import DistSvcError
from dist_svc.progress import Progress
from dist_svc.storage import open_checkpoint, tensor_bytes
from dist_svc.storage.hf_output import (
    TensorWriter, copy_side_files, create_partial, fsync_dir, layout_shards, partial_path, range_sha256, seal_shard,
    write_index,
)
from dist_svc.storage.safetensors_reader import DTYPES
from dist_svc.storage.zarr_store import (
    ZarrTensorWriter, array_sha256, create_array, create_group, is_zarr, sync_tree,
)

BLOCK_BYTES = 64 << 20


def convert(src: str | Path, dst: str | Path, fmt: str | None = None, compression: str = "none",
            shard_size: int = 5 * 10**9, progress: str = "auto", log: Callable[[str], None] = lambda s: None) -> dict:
    """Convert checkpoint `src` into `dst` ("zarr" or "safetensors"; by default zarr when `dst`
    ends in .zarr). Returns {"tensors", "bytes", "format"}."""
    dst = Path(dst).expanduser().resolve()
    fmt = fmt or ("zarr" if is_zarr(dst) else "safetensors")
    if fmt not in ("zarr", "safetensors"):
        raise DistSvcError(f"unknown output format '{fmt}'; use zarr or safetensors.")
    if compression != "none" and fmt != "zarr":
        raise DistSvcError("only zarr output can be compressed; drop --compression or write a .zarr store.")
    if dst.exists():
        raise DistSvcError(f"{dst} already exists; dist-svc never overwrites. Choose a new destination or remove it.")
    source = open_checkpoint(src)
    names = source.order()
    total = sum(info.nbytes for info in source.tensors.values())
    tmp = dst.with_name(f".{dst.name}.converting-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bar = Progress(total, len(names), mode=progress)
    try:
        if fmt == "zarr":
            _to_zarr(source, names, tmp, compression, bar)
        else:
            _to_safetensors(source, names, tmp, shard_size, bar)
        copy_side_files(Path(src), tmp, None)
        fsync_dir(tmp)
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
        source.close()
    log(f"converted {len(names)} tensors ({total} bytes) into {dst} ({fmt}), every tensor verified")
    return {"tensors": len(names), "bytes": total, "format": fmt}


def _blocks(source, name: str):
    """The tensor's rows in blocks of about BLOCK_BYTES, as raw bytes."""
    info = source.tensors[name]
    if len(info.shape) == 0:
        yield source.read(name)
        return
    row_bytes = max(1, math.prod(info.shape[1:]) * DTYPES[info.dtype][1])
    step = max(1, BLOCK_BYTES // row_bytes)
    for r0 in range(0, info.shape[0], step):
        yield source.read(name, rows=slice(r0, r0 + step))


def _to_zarr(source, names, root: Path, compression: str, bar: Progress) -> None:
    create_group(root, names)
    for name in names:
        info = source.tensors[name]
        create_array(root, name, info.shape, info.dtype, compression)
        writer = ZarrTensorWriter(root, name, info.shape, info.dtype, sync=True)
        for block in _blocks(source, name):
            writer.write(tensor_bytes(block))
        digest = writer.close()
        if array_sha256(root, name) != digest:
            raise DistSvcError(f"{root}: tensor '{name}' reads back differently from what was written; "
                               f"the destination storage is not reliable.")
        bar.advance(info.nbytes)
    sync_tree(root / "zarr.json")


def _to_safetensors(source, names, root: Path, shard_size: int, bar: Progress) -> None:
    entries = [(n, source.tensors[n].dtype, source.tensors[n].shape) for n in names]
    shards, placements = layout_shards(entries, shard_size)
    for shard in shards:
        partial = partial_path(root, shard)
        create_partial(partial, shard)
        for name in shard.tensors:
            place = placements[name]
            writer = TensorWriter(partial, place.offset, place.nbytes, sync=True)
            for block in _blocks(source, name):
                writer.write(tensor_bytes(block))
            digest = writer.close()  # sha256 of the bytes read from the source
            if range_sha256(partial, place.offset, place.nbytes) != digest:
                raise DistSvcError(f"{partial}: tensor '{name}' reads back differently from what was written; "
                                   f"the destination storage is not reliable.")
            bar.advance(place.nbytes)
        seal_shard(partial, root / shard.file)
    dtypes = {n: d for n, d, _ in entries}
    shapes = {n: s for n, _, s in entries}
    write_index(root, shards, dtypes, shapes)
