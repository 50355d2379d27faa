"""The output layout, in one place: Hugging Face sharded safetensors written in place.

Every output tensor's shape and dtype is known from the plan, so each shard's header, and so
every tensor's byte offset, is fixed before any data exists. A shard is first created as
`NAME.partial` (header + pre-sized data area); workers write their tensor's bytes at its offset
in any order, from any process or node that sees the directory, and fsync; once all of a
shard's tensors are written and their bytes verify against their checksums, the file is fsynced
and renamed to NAME. The index and the side files (config, tokenizer) are written last, each via
temp file + fsync + rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from dist_svc.storage.safetensors_reader import DTYPES, INDEX_NAME

PARTIAL_SUFFIX = ".partial"
# Files of the base checkpoint that belong with the merged weights (copied when present).
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
)


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


@dataclass(frozen=True)
class Placement:
    """Where one tensor's bytes go: shard number and absolute byte offset in that file."""

    shard: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ShardLayout:
    file: str
    header: bytes  # the complete 8-byte length prefix + JSON header, padded to 8 bytes
    size: int
    tensors: tuple[str, ...]


def layout_shards(tensors: list[tuple[str, str, tuple[int, ...]]], max_shard_bytes: int
                  ) -> tuple[list[ShardLayout], dict[str, Placement]]:
    """Pack (name, dtype, shape) in the given order into shards of at most `max_shard_bytes`
    of tensor data (a tensor larger than that gets a shard of its own), and fix every offset.

    Within a shard, tensors are laid out by dtype size (largest first) so every tensor's data is
    aligned to its element size, as safetensors' own writer does.
    """
    groups: list[list[tuple[str, str, tuple[int, ...]]]] = []
    current: list = []
    current_bytes = 0
    for entry in tensors:
        nbytes = _nbytes(entry[1], entry[2])
        if current and current_bytes + nbytes > max_shard_bytes:
            groups.append(current)
            current, current_bytes = [], 0
        current.append(entry)
        current_bytes += nbytes
    if current:
        groups.append(current)

    shards: list[ShardLayout] = []
    placements: dict[str, Placement] = {}
    for k, group in enumerate(groups):
        ordered = sorted(group, key=lambda e: -DTYPES[e[1]][1])  # stable: keeps plan order per dtype
        header: dict = {"__metadata__": {"format": "pt"}}
        position = 0
        for name, dtype, shape in ordered:
            nbytes = _nbytes(dtype, shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + nbytes]}
            position += nbytes
        body = json.dumps(header, separators=(",", ":")).encode()
        body += b" " * (-(len(body)) % 8)
        prefix = len(body).to_bytes(8, "little") + body
        for name, dtype, shape in ordered:
            begin = header[name]["data_offsets"][0]
            placements[name] = Placement(k, len(prefix) + begin, _nbytes(dtype, shape))
        shards.append(ShardLayout(shard_name(k, len(groups)), prefix, len(prefix) + position,
                                  tuple(name for name, _, _ in ordered)))
    return shards, placements


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = DTYPES[dtype][1]
    for d in shape:
        n *= d
    return n


def partial_path(out_dir: Path, shard: ShardLayout) -> Path:
    return out_dir / (shard.file + PARTIAL_SUFFIX)


def create_partial(path: Path, shard: ShardLayout) -> None:
    """The shard's file with its final header and a zero-filled (sparse) data area, durable."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(shard.header)
        f.truncate(shard.size)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class TensorWriter:
    """Writes one tensor's bytes at its place in a shard, in pieces that arrive in order, and
    hashes them on the way. With `sync`, `close()` makes them durable (fdatasync) before anyone
    can record them; without, whoever records them must sync the file first (`sync_file`)."""

    def __init__(self, path: Path, offset: int, nbytes: int, sync: bool = True):
        self.sync = sync
        self.fd = os.open(path, os.O_WRONLY)
        self.offset, self.end = offset, offset + nbytes
        self.hash = hashlib.sha256()

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        if self.offset + len(view) > self.end:
            raise ValueError("more bytes than the tensor's planned size")
        self.hash.update(view)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.offset + done)
        self.offset += len(view)

    def close(self) -> str:
        """fsync and return the sha256 of everything written; the tensor must be complete."""
        try:
            if self.offset != self.end:
                raise ValueError(f"tensor incomplete: {self.end - self.offset} bytes missing")
            if self.sync:
                os.fdatasync(self.fd)
        finally:
            os.close(self.fd)
        return self.hash.hexdigest()

    def abort(self) -> None:
        os.close(self.fd)


def range_sha256(path: Path, offset: int, nbytes: int) -> str:
    """sha256 of a byte range of a file, read in 64 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = nbytes
        while left:
            chunk = f.read(min(left, 64 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def sync_file(path: Path) -> None:
    """Make a file's data durable."""
    _sync(path, os.fdatasync)


def seal_shard(partial: Path, final: Path) -> None:
    """Make a fully written and verified shard visible under its final name."""
    sync_file(partial)
    os.replace(partial, final)
    fsync_dir(final.parent)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_index(out_dir: Path, shards: list[ShardLayout], dtypes: dict[str, str], shapes: dict[str, tuple]) -> None:
    weight_map = {}
    total = 0
    for shard in shards:
        for name in shard.tensors:
            weight_map[name] = shard.file
            total += _nbytes(dtypes[name], shapes[name])
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write(out_dir / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())


def copy_side_files(base_dir: Path, out_dir: Path, out_dtype: str | None) -> list[str]:
    """Copy config/tokenizer files from the base; `config.json` gets the output dtype (a torch
    dtype name such as "bfloat16") when one was chosen."""
    copied = []
    if not base_dir.is_dir():
        return copied
    for name in SIDE_FILES:
        src = base_dir / name
        if not src.is_file():
            continue
        data = src.read_bytes()
        if name == "config.json" and out_dtype is not None:
            data = _with_dtype(data, out_dtype)
        atomic_write(out_dir / name, data)
        shutil.copymode(src, out_dir / name)
        copied.append(name)
    return copied


def _with_dtype(config_bytes: bytes, dtype: str) -> bytes:
    try:
        config = json.loads(config_bytes)
    except ValueError:
        return config_bytes  # not ours to repair; copied as is
    if not isinstance(config, dict):
        return config_bytes
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = dtype
    return (json.dumps(config, indent=2) + "\n").encode()


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it) durable."""
    _sync(path, os.fsync)


def _sync(path: Path, how) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        how(fd)
    finally:
        os.close(fd)
