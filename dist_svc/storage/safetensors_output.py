"""Output as Hugging Face sharded safetensors, in an `OutputDir`, written as the directory can.

Every output tensor's shape and dtype is known from the plan, so each shard's header, and so
every tensor's byte offset, is fixed before any data exists.

Where the directory can `write_at_offset` (a local or shared filesystem), a shard is first
created as `NAME.partial` (header + pre-sized data area); workers write their tensor's bytes at
its offset in any order, from any process or node that sees the directory. Once all of a
shard's tensors are recorded and their bytes verify against their checksums, the file is
fsynced and renamed to NAME: a file under a shard's final name is always complete. The index
and the side files (config, tokenizer) are written last, each via temp file + fsync + rename.

Where it cannot (object storage: an object is written once, whole), it stages and assembles:
each tensor is staged as an object of its own (`.dist-svc-staging/SHARD/TENSOR`, written by
whichever worker or node computed it, hashed on the way; a shard's first tensor behind the
shard's header), and sealing a shard assembles its tensors' staged objects, in order, into one
multipart upload of the shard inside the storage service (`OutputDir.assemble`: UploadPartCopy,
the bytes are not downloaded), whose completion makes it appear whole under its final name; the
staged objects are deleted then. A staged tensor this run did not hash as it uploaded it is
re-read against its recorded checksum first. A killed run leaves staged objects
(kept: their tensors are recorded) and at most an unfinished upload (invisible, aborted by the
next run).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterable, Mapping, Sequence

from dist_svc.storage.checksum import Hasher, range_checksum
from dist_svc.storage.durable import fsync_dir, sync_file
from dist_svc.storage.outdir import MIN_PART_BYTES, output_dir
from dist_svc.storage.output import DEFAULT_SHARD_BYTES, Entry, side_file_problems
from dist_svc.storage.types import INDEX_NAME, ITEMSIZE, tensor_nbytes

PARTIAL_SUFFIX = ".partial"
STAGING = ".dist-svc-staging"  # staged tensors, where shards are assembled rather than written in place


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


def layout_shards(entries: Sequence[Entry], max_shard_bytes: int) -> tuple[list[ShardLayout], dict[str, Placement]]:
    """Pack (name, dtype, shape) in the given order into shards of at most `max_shard_bytes`
    of tensor data (a tensor larger than that gets a shard of its own), and fix every offset.

    Within a shard, tensors are laid out by dtype size (largest first) so every tensor's data is
    aligned to its element size, as safetensors' own writer does; tensors smaller than an object
    store's smallest multipart part come after the others (where that keeps the alignment): a
    shard assembled inside the storage service then copies each large tensor as parts of its
    own and passes only the small ones through the assembling process, as its last part
    (`ObjectDir.assemble`; the same order on every storage, so the bytes are the same).
    """
    groups: list[list[Entry]] = []
    current: list[Entry] = []
    current_bytes = 0
    for entry in entries:
        nbytes = tensor_nbytes(entry[1], entry[2])
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
        ordered = _small_last(sorted(group, key=lambda e: -ITEMSIZE[e[1]]))  # stable: plan order per dtype
        header: dict = {"__metadata__": {"format": "pt"}}
        position = 0
        for name, dtype, shape in ordered:
            nbytes = tensor_nbytes(dtype, shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + nbytes]}
            position += nbytes
        body = json.dumps(header, separators=(",", ":")).encode()
        body += b" " * (-(len(body)) % 8)
        prefix = len(body).to_bytes(8, "little") + body
        for name, dtype, shape in ordered:
            begin = header[name]["data_offsets"][0]
            placements[name] = Placement(k, len(prefix) + begin, tensor_nbytes(dtype, shape))
        shards.append(ShardLayout(shard_name(k, len(groups)), prefix, len(prefix) + position,
                                  tuple(name for name, _, _ in ordered)))
    return shards, placements


def _small_last(ordered: list[Entry]) -> list[Entry]:
    """`ordered` (by dtype size, largest first) with the tensors under MIN_PART_BYTES moved to
    the end, each part still by dtype size, when every small tensor's data stays aligned to its
    element size; else as it was."""
    small = [e for e in ordered if tensor_nbytes(e[1], e[2]) < MIN_PART_BYTES]
    large = [e for e in ordered if tensor_nbytes(e[1], e[2]) >= MIN_PART_BYTES]
    if not small or not large or sum(tensor_nbytes(e[1], e[2]) for e in large) % ITEMSIZE[small[0][1]]:
        return ordered
    return large + small


class TensorWriter:
    """Writes one tensor's bytes at its place in a file, in pieces that arrive in order, and
    hashes them on the way; or, for a matrix, ranges of its columns in any order
    (`write_columns`), hashed when complete by reading the tensor back. With `sync`, `close()`
    makes them durable (fdatasync) before anyone can record them; without, whoever records them
    must sync the file first."""

    columns = True

    def __init__(self, path: Path, offset: int, nbytes: int, sync: bool = True, shape: tuple[int, ...] = ()):
        self.sync = sync
        self.path = path
        self.fd = os.open(path, os.O_WRONLY)
        self.start, self.offset, self.end = offset, offset, offset + nbytes
        self.shape = shape
        self.hash = Hasher()
        self.columns_written = 0
        self.seconds = {"checksum": 0.0, "write": 0.0}

    def write_columns(self, start: int, stop: int, data) -> None:
        """Columns start..stop of a matrix, `data` their rows x (stop - start) elements in
        row-major order: one positional write per row."""
        began = time.perf_counter()
        rows, cols = self.shape
        view = memoryview(data).cast("B")
        width = len(view) // max(rows, 1)
        item = width // max(stop - start, 1)
        for r in range(rows):
            piece = view[r * width:(r + 1) * width]
            where = self.start + (r * cols + start) * item
            done = 0
            while done < len(piece):
                done += os.pwrite(self.fd, piece[done:], where + done)
        self.columns_written += stop - start
        self.seconds["write"] += time.perf_counter() - began

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        if self.offset + len(view) > self.end:
            raise ValueError("more bytes than the tensor's planned size")
        start = time.perf_counter()
        self.hash.update(view)
        hashed = time.perf_counter()
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.offset + done)
        self.offset += len(view)
        self.seconds["checksum"] += hashed - start
        self.seconds["write"] += time.perf_counter() - hashed

    def close(self) -> str:
        try:
            by_columns = self.columns_written and self.offset == self.start
            if by_columns and self.columns_written != self.shape[1]:
                raise ValueError(f"tensor incomplete: {self.shape[1] - self.columns_written} columns missing")
            if not by_columns and self.offset != self.end:
                raise ValueError(f"tensor incomplete: {self.end - self.offset} bytes missing")
            if self.sync:
                os.fdatasync(self.fd)
        finally:
            os.close(self.fd)
        if by_columns:  # written out of order: hashed as stored, in order
            start = time.perf_counter()
            digest = range_checksum(self.path, self.start, self.end - self.start)
            self.seconds["checksum"] += time.perf_counter() - start
            return digest
        return self.hash.digest()

    def abort(self) -> None:
        os.close(self.fd)


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


def seal_file(partial: Path, final: Path) -> None:
    """Make a fully written and verified file visible under its final name."""
    sync_file(partial)
    os.replace(partial, final)
    fsync_dir(final.parent)


def index_bytes(shards: Sequence[ShardLayout], placements: Mapping[str, Placement]) -> bytes:
    weight_map = {name: shard.file for shard in shards for name in shard.tensors}
    total = sum(p.nbytes for p in placements.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    return (json.dumps(index, indent=2) + "\n").encode()


class SafetensorsLayout:
    """Sharded safetensors in an `OutputDir`, written as the directory can (see the module's
    docstring): in place where it can `write_at_offset`, else staged and assembled."""

    format: ClassVar[str] = "safetensors"

    def __init__(self, out_dir, entries: Sequence[Entry], options: Mapping):
        self.out = output_dir(out_dir)
        self.out_dir = self.out.named
        self.in_place = self.out.write_at_offset
        self.shards, self.placements = layout_shards(entries, int(options.get("shard_bytes") or DEFAULT_SHARD_BYTES))
        self.shapes = {name: tuple(shape) for name, _, shape in entries}
        # staged, each shard's first tensor is staged behind the shard's header
        self._leads = {min(shard.tensors, key=lambda n: self.placements[n].offset) for shard in self.shards}
        self._remaining: list[int] = []  # per shard: tensors not yet recorded (after `prepare`)
        self._sealed: list[bool] = []
        self._ready: set[int] = set()  # shards with every tensor recorded, not yet sealed

    # -- names -----------------------------------------------------------------------------------

    def final(self, k: int) -> Path:
        """In place: the shard's path under its final name."""
        return self.out.path / self.shards[k].file

    def partial(self, k: int) -> Path:
        """In place: the shard's path while it is written."""
        return self.out.path / (self.shards[k].file + PARTIAL_SUFFIX)

    def staged(self, name: str) -> str:
        """Staged: the name of a tensor's own object until its shard is assembled."""
        place = self.placements[name]
        return f"{STAGING}/{self.shards[place.shard].file}/{hashlib.sha256(name.encode()).hexdigest()[:40]}"

    def _prefix(self, name: str) -> bytes:
        """Staged: what precedes the tensor's bytes in its staged object (its shard's header, for
        the shard's first tensor: the header is then copied into the shard with it)."""
        return self.shards[self.placements[name].shard].header if name in self._leads else b""

    def _staged_bytes(self, name: str) -> int:
        return len(self._prefix(name)) + self.placements[name].nbytes

    def _is_sealed(self, k: int) -> bool:
        shard = self.shards[k]
        if self.in_place:
            final = self.final(k)
            return final.is_file() and final.stat().st_size == shard.size
        if self.out.size(shard.file) != shard.size:
            return False
        return self.out.read_range(shard.file, 0, len(shard.header)) == shard.header

    # -- the driver's side ----------------------------------------------------------------------

    def prepare(self, recorded: Mapping[str, str]) -> list[str]:
        self._remaining, self._sealed, self._ready = [], [], set()
        redo = self._prepare_in_place(recorded) if self.in_place else self._prepare_staged(recorded)
        for k in range(len(self.shards)):
            if not self._remaining[k] and not self._sealed[k]:
                self._ready.add(k)
        return redo

    def _prepare_in_place(self, recorded: Mapping[str, str]) -> list[str]:
        """A shard under its final name stays sealed only if every tensor in it is recorded (a
        run killed between sealing and saving the manifest, or a forged manifest, sends it back
        to `.partial`, to be verified and sealed again). A partial that is missing, or whose
        header or size is not the planned one, is recreated and its recorded tensors run again."""
        redo: list[str] = []
        for k, shard in enumerate(self.shards):
            final, partial = self.final(k), self.partial(k)
            unrecorded = sum(name not in recorded for name in shard.tensors)
            if self._is_sealed(k) and not unrecorded and not partial.exists():
                self._remaining.append(0)
                self._sealed.append(True)
                continue
            if final.exists() and partial.exists():
                final.unlink()
            elif final.exists():
                os.replace(final, partial)
            if not self._partial_ok(k):
                create_partial(partial, shard)
                lost = [name for name in shard.tensors if name in recorded]
                redo += lost
                unrecorded += len(lost)
            self._remaining.append(unrecorded)
            self._sealed.append(False)
        return redo

    def _prepare_staged(self, recorded: Mapping[str, str]) -> list[str]:
        """Unfinished uploads of shards (a seal killed midway) are aborted. A sealed shard stays
        sealed if every tensor in it is recorded; otherwise (a forged or rolled-back manifest) it
        is deleted and its tensors run again. In an unsealed shard, a recorded tensor whose
        staged object is missing or of the wrong size runs again."""
        self._abort_uploads()
        staged = {f"{STAGING}/{key}": size for key, size, _ in self.out.walk(STAGING)}
        redo: list[str] = []
        for k, shard in enumerate(self.shards):
            unrecorded = sum(name not in recorded for name in shard.tensors)
            if self._is_sealed(k):
                if not unrecorded:
                    self._remaining.append(0)
                    self._sealed.append(True)
                    # a seal killed after the upload, before its staged tensors were deleted
                    self.out.delete_many([self.staged(n) for n in shard.tensors if self.staged(n) in staged])
                    continue
                self.out.delete(shard.file)
                lost = [name for name in shard.tensors if name in recorded]
                redo += lost
                unrecorded += len(lost)
            else:
                for name in shard.tensors:
                    if name in recorded and staged.get(self.staged(name)) != self._staged_bytes(name):
                        redo.append(name)
                        unrecorded += 1
            self._remaining.append(unrecorded)
            self._sealed.append(False)
        return redo

    def _abort_uploads(self) -> None:
        """This output's own unfinished uploads, of its shards and of its staged tensors (not
        other clients' uploads in the bucket: see `OutputDir.abort_uploads`)."""
        self.out.abort_uploads(shard.file for shard in self.shards)
        self.out.abort_uploads(self.staged(name) for name in self.placements)

    def _partial_ok(self, k: int) -> bool:
        shard = self.shards[k]
        try:
            if self.partial(k).stat().st_size != shard.size:
                return False
            with open(self.partial(k), "rb") as f:
                return f.read(len(shard.header)) == shard.header
        except FileNotFoundError:
            return False

    def on_recorded(self, name: str) -> bool:
        k = self.placements[name].shard
        self._remaining[k] -= 1
        if self._remaining[k] == 0 and not self._sealed[k]:
            self._ready.add(k)
        return bool(self._ready)

    def seal(self, recorded: Mapping[str, str], fresh: set[str]) -> list[str]:
        """Seal each ready shard once the bytes of its tensors not in `fresh` match their
        checksums (re-read); a shard with damaged tensors waits for them to be run again."""
        damaged: list[str] = []
        for k in sorted(self._ready):
            self._ready.discard(k)
            bad = self._seal_in_place(k, recorded, fresh) if self.in_place else self._assemble(k, recorded, fresh)
            if bad:
                self._remaining[k] += len(bad)
                damaged += bad
                continue
            self._sealed[k] = True
            if not self.in_place:
                self.out.delete_many([self.staged(n) for n in self.shards[k].tensors])
        return damaged

    def _seal_in_place(self, k: int, recorded: Mapping[str, str], fresh: set[str]) -> list[str]:
        partial = self.partial(k)
        if not self._partial_ok(k):  # gone or cut short under us: every tensor again
            create_partial(partial, self.shards[k])
            return list(self.shards[k].tensors)
        bad = [n for n in self.shards[k].tensors if n not in fresh and self.stored_checksum(n) != recorded[n]]
        if not bad:
            seal_file(partial, self.final(k))
        return bad

    def _assemble(self, k: int, recorded: Mapping[str, str], fresh: set[str]) -> list[str]:
        """The shard as one upload of its header and its staged tensors in order, assembled
        inside the storage service (`OutputDir.assemble`: the tensors' bytes are copied there,
        not through this process). First every staged tensor is checked: of its planned size,
        and, unless this run's writer hashed it as it uploaded it (`fresh`), re-read against its
        recorded checksum; a damaged one stops the shard and is run again."""
        shard = self.shards[k]
        order = sorted(shard.tensors, key=lambda n: self.placements[n].offset)
        sizes = {f"{STAGING}/{shard.file}/{key}": size for key, size, _ in self.out.walk(f"{STAGING}/{shard.file}")}
        bad = [n for n in order if sizes.get(self.staged(n)) != self._staged_bytes(n) or
               (n not in fresh and self._staged_checksum(n) != recorded[n])]
        if not bad:
            self.out.assemble(shard.file, [(self.staged(n), 0, self._staged_bytes(n)) for n in order])
        return bad

    def _staged_checksum(self, name: str) -> str | None:
        """The checksum of a tensor's staged bytes (None: gone, or a header in front of them
        that is not its shard's)."""
        prefix = self._prefix(name)
        if prefix and self.out.read_range(self.staged(name), 0, len(prefix)) != prefix:
            return None
        return self.out.range_checksum(self.staged(name), len(prefix), self.placements[name].nbytes)

    def finish(self, recorded: Mapping[str, str], side_files: Mapping[str, bytes]) -> None:
        self.out.delete_many([f"{STAGING}/{key}" for key, _, _ in self.out.walk(STAGING)])  # what a killed run left
        self.out.write(INDEX_NAME, index_bytes(self.shards, self.placements))
        for name, data in side_files.items():
            self.out.write(name, data)

    # -- any process -----------------------------------------------------------------------------

    def writer(self, name: str, sync: bool) -> "TensorWriter | ObjectTensorWriter":
        place = self.placements[name]
        if self.in_place:
            return TensorWriter(self.partial(place.shard), place.offset, place.nbytes, sync, self.shapes[name])
        return ObjectTensorWriter(self.out, self.staged(name), place.nbytes, self._prefix(name))

    def make_durable(self, names: Iterable[str]) -> None:
        if not self.in_place:
            return  # an uploaded object is durable
        for k in sorted({self.placements[n].shard for n in names}):
            if self.partial(k).exists():  # a sealed shard was synced when it was sealed
                sync_file(self.partial(k))

    def stored_checksum(self, name: str) -> str | None:
        place = self.placements[name]
        if self.in_place:
            path = self.partial(place.shard)
            if not path.exists():
                path = self.final(place.shard)
            return range_checksum(path, place.offset, place.nbytes)
        if self.out.size(self.staged(name)) == self._staged_bytes(name):
            return self._staged_checksum(name)
        return self.out.range_checksum(self.shards[place.shard].file, place.offset, place.nbytes)

    # -- checking ----------------------------------------------------------------------------------

    def problems(self, recorded: Mapping[str, str], side_files: Mapping[str, str], deep: bool) -> list[str]:
        out = []
        for k, shard in enumerate(self.shards):
            where = self.out.where(shard.file)
            size = self.out.size(shard.file)
            if size is None:
                out.append(f"{where}: {self._unsealed_state(k)}")
                continue
            if size != shard.size:
                out.append(f"{where}: {size} bytes, planned {shard.size} (truncated or extended)")
                continue
            if self.out.read_range(shard.file, 0, len(shard.header)) != shard.header:
                out.append(f"{where}: its header is not the planned one")
                continue
            if deep:
                for name in shard.tensors:
                    place = self.placements[name]
                    if name not in recorded:
                        out.append(f"{where}: tensor '{name}' is not recorded as merged")
                    elif self.out.range_checksum(shard.file, place.offset, place.nbytes) != recorded[name]:
                        out.append(f"{where}: tensor '{name}' does not match its checksum (corrupted)")
        index = self.out.read(INDEX_NAME)
        if index is None:
            out.append(f"{self.out.where(INDEX_NAME)}: missing")
        elif index != index_bytes(self.shards, self.placements):
            out.append(f"{self.out.where(INDEX_NAME)}: does not map every tensor to its shard as planned")
        return out + side_file_problems(self.out, side_files, deep)

    def _unsealed_state(self, k: int) -> str:
        shard = self.shards[k]
        if self.in_place:
            return "still being written (.partial)" if self.partial(k).exists() else "missing"
        return "still being written (tensors staged)" if any(self.out.walk(f"{STAGING}/{shard.file}")) else "missing"

    def stamps(self, side_files: Iterable[str]) -> dict[str, str]:
        names = [*(shard.file for shard in self.shards), INDEX_NAME, *side_files]
        return {name: stamp for name in names if (stamp := self.out.stamp(name)) is not None}

    def damaged(self, recorded: Mapping[str, str], changed: Iterable[str]) -> list[str]:
        """The recorded tensors of each changed shard whose bytes fail their checksums (the index
        and side files are rewritten by every run's `finish`)."""
        changed = set(changed)
        return [name for k, shard in enumerate(self.shards) if shard.file in changed and self._is_sealed(k)
                for name in shard.tensors if name in recorded and self.stored_checksum(name) != recorded[name]]

    def state(self) -> list[str]:
        sealed = sum(self._is_sealed(k) for k in range(len(self.shards)))
        return [f"shards  {sealed}/{len(self.shards)} written"]


class ObjectTensorWriter:
    """One tensor's bytes uploaded as one object (multipart when large) behind `prefix` (not
    part of the tensor: its shard's header, for a shard's first tensor), hashed on the way; the
    object exists only once `close` has uploaded all of it."""

    columns = False  # an object is uploaded in order, once

    def __init__(self, out, name: str, nbytes: int, prefix: bytes = b""):
        self.out, self.name, self.nbytes = out, name, nbytes
        self.file = out.writer(name)
        if prefix:
            self.out.call(self.file.write, prefix, what=self.out.where(name))
        self.written = 0
        self.hash = Hasher()
        self.seconds = {"checksum": 0.0, "write": 0.0}

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        if self.written + len(view) > self.nbytes:
            raise ValueError("more bytes than the tensor's planned size")
        start = time.perf_counter()
        self.hash.update(view)
        hashed = time.perf_counter()
        self.out.call(self.file.write, view, what=self.out.where(self.name))
        self.written += len(view)
        self.seconds["checksum"] += hashed - start
        self.seconds["write"] += time.perf_counter() - hashed

    def close(self) -> str:
        if self.written != self.nbytes:
            self.abort()
            raise ValueError(f"tensor incomplete: {self.nbytes - self.written} bytes missing")
        self.out.call(self.file.close, what=self.out.where(self.name))
        return self.hash.digest()

    def abort(self) -> None:
        """The upload is abandoned: its parts are deleted and the object never appears (also
        not when the file object is garbage-collected, which would otherwise commit it)."""
        try:
            self.file.discard()
        except Exception:
            pass  # parts already uploaded stay invisible: an unfinished upload is no object
        self.file.closed = True
