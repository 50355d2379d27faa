"""Where a merge's output goes: a local directory, or a prefix on object storage (s3://).

`OutputDir` (a Protocol, below) is what the manifest, the run's lock and the output layouts
write through; `output_dir()` makes one from a path or URL. Layouts ask it what it can do
through its capability flags, never which implementation it is: `LocalDir` and `ObjectDir`
are the only places that know local from remote. The two keep the same promises in their own
terms:

| promise | local directory (`LocalDir`) | object storage (`ObjectDir`) |
| --- | --- | --- |
| a file appears whole or not at all | temp file + fsync + rename + fsync of the directory | a PUT (or a completed multipart upload) is atomic |
| durable once written | fsync / fdatasync | acknowledged by the service |
| the manifest's journal | one file, appended (O_APPEND + fdatasync) | one object per save (`NAME.00000007`), created only if absent (`If-None-Match: *`) |
| one writer at a time (`exclusive`) | `flock`, released by the kernel when the process dies | conditional writes: the journal's next segment and every new snapshot are conditional puts, so a second writer fails at its first write; and a lease lock (`RemoteLock`) |

Only local paths are `Path`s; an object-storage output is named by its URL throughout.
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Iterator, Protocol, runtime_checkable

from dist_svc.errors import DistSvcError
from dist_svc.storage.checksum import READ_PIECE, Hasher, range_checksum
from dist_svc.storage.durable import atomic_write, fsync_dir, sync_tree, temp_path
from dist_svc.storage.location import LocalLocation, RemoteLocation, is_url

SEGMENT = re.compile(r"\.(\d{8})$")
ASSEMBLY_PART_BYTES = 16 << 20  # bytes gathered for an assembled object are uploaded in parts of this size
MIN_PART_BYTES = 5 << 20  # S3: every part of a multipart upload but the last is at least this
MAX_COPY_BYTES = 5 << 30  # S3: one UploadPartCopy copies at most this


@runtime_checkable
class OutputDir(Protocol):
    """Where a merge's output goes (the write side of storage). Names are paths relative to
    the directory ("a/zarr.json"). What an implementation can do is declared by its
    capability flags; the methods listed under a flag exist only where it is true:

    - `write_at_offset`: a file can be created at its full size and then written in place, at
      byte offsets, by any process that sees the directory (`path`: positional writes, fsync).
      Else every file is written once, whole.
    - `conditional_put`: `create` (only if absent) and `replace_if` (only if still the version
      last seen): what keeps a second writer out where no lock dies with its process.
    - `multipart_assembly`: a large file is uploaded in parts and appears only once complete
      (`writer`, `assemble`); an unfinished upload is invisible, and `abort_uploads` drops the
      ones a killed run left, of the names given only.
    - `ordered_versions`: the version `walk` gives a file is its modification time, which only
      grows, so the newest of a set says whether any changed; else versions are opaque (ETags).
    """

    write_at_offset: ClassVar[bool]
    conditional_put: ClassVar[bool]
    multipart_assembly: ClassVar[bool]
    ordered_versions: ClassVar[bool]
    url: str  # the path or URL, as messages name it
    named: "Path | str"  # the directory as the rest of dist-svc names it: a Path if local, else its URL

    def where(self, name: str = "") -> str: ...

    def exists(self) -> bool: ...

    def is_dir(self) -> bool: ...

    def mkdir(self) -> None: ...

    def names(self) -> list[str]:
        """What is directly in the directory (files and subdirectories), sorted."""

    def read(self, name: str) -> bytes | None:
        """A whole file; None when absent."""

    def read_range(self, name: str, start: int, stop: int) -> bytes: ...

    def write(self, name: str, data: bytes) -> None:
        """`name` becomes `data`, whole or not at all, durably."""

    def delete(self, name: str) -> None:
        """Removed if present."""

    def delete_many(self, names: list[str]) -> None: ...

    def size(self, name: str) -> int | None: ...

    def stamp(self, name: str) -> str | None:
        """What identifies the file as it is now without reading it ("size:mtime_ns" locally,
        "size:ETag" on object storage); None if missing. A rewrite gives a new one."""

    def walk(self, prefix: str) -> Iterator[tuple[str, int, object]]:
        """(name relative to `prefix`, size, version) of every file under `prefix` (one
        listing; see `ordered_versions`)."""

    def range_checksum(self, name: str, offset: int, nbytes: int) -> str | None: ...

    def sync(self, prefix: str) -> None:
        """Everything under `prefix` is durable."""

    def zarr_store(self, read_only: bool = False): ...

    def replace(self, name: str, data: bytes, keep: str | None = None) -> None:
        """`name` becomes `data`, durably; the file it replaces is kept as `keep`. A second
        writer that replaced it meanwhile is an error where the storage can tell."""

    def journal_read(self, name: str) -> bytes:
        """Everything appended to the journal `name` so far."""

    def journal_append(self, name: str, data: bytes) -> None:
        """`data` appended to the journal `name`, durably."""

    def journal_remove(self, name: str) -> None: ...

    def journal_close(self, name: str | None = None) -> None: ...

    def journals(self, pattern: str) -> list[str]:
        """The journals whose name matches the glob `pattern`."""

    def exclusive(self, name: str, log: Callable[[str], None] = lambda line: None):
        """A context manager: this process holds the lock `name` until the block ends, or the
        block is not entered (an error naming the run that holds it). Yields a check that raises
        if the lock was lost meanwhile. A lock left by a killed process is taken over."""

    def lock_holder(self, name: str) -> "Lease | None":
        """Whether a live run holds the lock `name` now, without waiting for it (None: no lock)."""


def output_dir(out: "str | Path | OutputDir") -> OutputDir:
    """The output directory named by a local path or an s3:// URL (an `OutputDir` is itself)."""
    if not isinstance(out, (str, os.PathLike)):
        return out
    if isinstance(out, str) and is_url(out):
        return ObjectDir(out)
    return LocalDir(Path(out))


class LocalDir:
    """A directory on a local (or shared, POSIX) filesystem."""

    write_at_offset = True
    conditional_put = False
    multipart_assembly = False
    ordered_versions = True

    def __init__(self, path: Path):
        self.path = Path(path)
        self.url = str(self.path)
        self.named = self.path
        self._journals: dict[str, int] = {}

    def __str__(self) -> str:
        return self.url

    def __reduce__(self):
        return (LocalDir, (self.path,))

    def where(self, name: str = "") -> str:
        return str(self.path / name) if name else self.url

    def exists(self) -> bool:
        return self.path.exists()

    def is_dir(self) -> bool:
        return self.path.is_dir()

    def mkdir(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []

    def read(self, name: str) -> bytes | None:
        try:
            return (self.path / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        with open(self.path / name, "rb") as f:
            f.seek(start)
            return f.read(stop - start)

    def write(self, name: str, data: bytes) -> None:
        path = self.path / name
        made = [d for d in path.parents if d.is_relative_to(self.path) and not d.is_dir()]
        if made:  # a name in folders not there yet: made, as object storage takes any key
            path.parent.mkdir(parents=True)
            for folder in reversed(made):
                fsync_dir(folder.parent)
        atomic_write(path, data)

    def delete(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)

    def delete_many(self, names: list[str]) -> None:
        for name in names:
            self.delete(name)

    def size(self, name: str) -> int | None:
        try:
            return (self.path / name).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def stamp(self, name: str) -> str | None:
        """Size and modification time in ns: a rewrite in place that keeps the size still
        changes the time."""
        try:
            st = os.stat(self.path / name)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return f"{st.st_size}:{st.st_mtime_ns}"

    def walk(self, prefix: str) -> Iterator[tuple[str, int, int]]:
        return LocalLocation(self.path).walk(prefix)

    def range_checksum(self, name: str, offset: int, nbytes: int) -> str | None:
        return range_checksum(self.path / name, offset, nbytes)

    def sync(self, prefix: str) -> None:
        sync_tree(self.path / prefix)

    def zarr_store(self, read_only: bool = False):
        return str(self.path)

    # -- the manifest's snapshot and journal ----------------------------------------------------

    def replace(self, name: str, data: bytes, keep: str | None = None) -> None:
        """`name` becomes `data`, durably; the file it replaces is kept as `keep`."""
        path = self.path / name
        if keep and path.exists():
            held = temp_path(self.path / keep)
            held.unlink(missing_ok=True)
            os.link(path, held)
            os.replace(held, self.path / keep)  # made durable by atomic_write's fsync of the directory
            # A rename onto a hard link of the same file does nothing (POSIX), and `keep` is one
            # after a kill between this rename and the next line's: the link is left to delete.
            held.unlink(missing_ok=True)
        atomic_write(path, data)

    def journal_read(self, name: str) -> bytes:
        return self.read(name) or b""

    def journal_append(self, name: str, data: bytes) -> None:
        fd = self._journals.get(name)
        if fd is None:
            path = self.path / name
            created = not path.exists()
            fd = self._journals[name] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if created:
                fsync_dir(self.path)
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        os.fdatasync(fd)

    def journal_remove(self, name: str) -> None:
        self.journal_close(name)
        self.delete(name)

    def journal_close(self, name: str | None = None) -> None:
        for key in [name] if name else list(self._journals):
            fd = self._journals.pop(key, None)
            if fd is not None:
                os.close(fd)

    def journals(self, pattern: str) -> list[str]:
        return sorted(p.name for p in self.path.glob(pattern))

    # -- one run at a time ---------------------------------------------------------------------

    @contextmanager
    def exclusive(self, name: str, log: Callable[[str], None] = lambda line: None) -> Iterator[Callable[[], None]]:
        """A `flock` on the file `name`: it dies with its process (kill -9 included); a run
        that ends in any other way removes the file too (after kill -9 it stays, harmless, until
        the next run)."""
        path = self.path / name
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise DistSvcError(f"another dist-svc run is merging into {self.path}; wait for it to finish "
                                   f"(see `dist-svc status {self.path}`).") from None
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break  # locked the file that is there now, not one a finishing run just removed
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            yield lambda: None
        finally:
            path.unlink(missing_ok=True)
            os.close(fd)

    def lock_holder(self, name: str) -> "Lease | None":
        """A lock file left by a killed run is not held: its `flock` died with the run."""
        try:
            fd = os.open(self.path / name, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return Lease(False, None, None)
        except BlockingIOError:
            return Lease(True, None, None)
        finally:
            os.close(fd)


class ObjectDir:
    """A prefix on object storage (S3 and S3-compatible services: conditional writes are
    needed for the single-writer rule)."""

    write_at_offset = False
    conditional_put = True
    multipart_assembly = True
    ordered_versions = False

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.named = self.url
        self.loc = RemoteLocation(self.url)
        self.protocol = self.loc.protocol
        if self.protocol not in ("s3", "s3a"):
            raise DistSvcError(f"{self.url}: merge outputs on object storage are written to s3:// (and S3-compatible "
                               f"services through AWS_ENDPOINT_URL), whose conditional writes keep one run per "
                               f"output; write to a local directory, or to s3://.")
        self.fs = self.loc.fs
        self.root = self.loc.root
        self.bucket, _, self.prefix = self.root.partition("/")
        self._segments: dict[str, int] = {}  # journal -> next segment number
        self._seen: dict[str, str] = {}  # object -> ETag this process wrote it with (`replace`)

    def __str__(self) -> str:
        return self.url

    def __reduce__(self):
        return (ObjectDir, (self.url,))

    def key(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def object_key(self, name: str) -> str:
        """`name`'s key in the bucket."""
        return self.key(name).partition("/")[2]

    def where(self, name: str = "") -> str:
        return f"{self.url}/{name}" if name else self.url

    def call(self, fn, *args, what: str | None = None, **kwargs):
        return self.loc.call(fn, *args, what=what or self.url, **kwargs)

    def _s3(self, op: str, name: str, **kwargs):
        return self.call(self.fs.call_s3, op, Bucket=self.bucket, Key=self.object_key(name),
                         what=self.where(name), **kwargs)

    def exists(self) -> bool:
        return bool(self.names())

    def is_dir(self) -> bool:
        return self.exists()

    def mkdir(self) -> None:
        self.call(self.fs.info, self.bucket, what=f"{self.protocol}://{self.bucket}")  # the bucket must exist

    def names(self) -> list[str]:
        """The objects and "directories" directly under the prefix."""
        try:
            entries = self.fs.ls(self.root, detail=False, refresh=True)
        except FileNotFoundError as e:
            if "bucket does not exist" in str(e).lower():
                raise self.loc.problem(e, self.url) from None
            return []
        except Exception as e:
            raise self.loc.problem(e, self.url) from None
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != self.root)

    def info(self, name: str) -> dict | None:
        try:
            return self.fs.info(self.key(name), refresh=True)
        except FileNotFoundError:
            return None
        except Exception as e:
            raise self.loc.problem(e, self.where(name)) from None

    def age(self, name: str) -> tuple[str, float | None] | None:
        """`name`'s ETag and how many seconds ago it was written, by the service's own clock (the
        response's Date against the object's Last-Modified, both in whole seconds; None where the
        service sends no Date); None if there is no such object."""
        try:
            head = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.object_key(name))
        except FileNotFoundError:
            return None
        except Exception as e:
            raise self.loc.problem(e, self.where(name)) from None
        date = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if not date:
            return head["ETag"], None
        return head["ETag"], (parsedate_to_datetime(date) - head["LastModified"]).total_seconds()

    def read(self, name: str) -> bytes | None:
        try:
            # a whole read asks the object's size first, from fsspec's listings cache: one made
            # before `name` was written says it is missing
            self.fs.invalidate_cache(self.key(name))
            return self.fs.cat_file(self.key(name))
        except FileNotFoundError:
            return None
        except Exception as e:
            raise self.loc.problem(e, self.where(name)) from None

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        if stop <= start:
            return b""  # fsspec reads an empty range as the whole object
        return self.call(self.fs.cat_file, self.key(name), start=start, end=stop, what=self.where(name))

    def write(self, name: str, data: bytes) -> None:
        self._s3("put_object", name, Body=data)

    def create(self, name: str, data: bytes) -> str | None:
        """Write `name` only if no object has that name (If-None-Match: *): its ETag, or None if
        one has."""
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.object_key(name), Body=data,
                                   IfNoneMatch="*")["ETag"]
        except FileExistsError:
            return None
        except Exception as e:
            if _precondition(e):
                return None
            raise self.loc.problem(e, self.where(name)) from None

    def replace_if(self, name: str, data: bytes, etag: str) -> str | None:
        """Write `name` only if it is still the object with `etag` (If-Match): the new ETag, or
        None if it is not."""
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.object_key(name), Body=data,
                                   IfMatch=etag)["ETag"]
        except FileNotFoundError:
            return None
        except Exception as e:
            if _precondition(e):
                return None
            raise self.loc.problem(e, self.where(name)) from None

    def delete(self, name: str) -> None:
        try:
            self.fs.rm_file(self.key(name))
        except FileNotFoundError:
            pass
        except Exception as e:
            raise self.loc.problem(e, self.where(name)) from None

    def delete_many(self, names: list[str]) -> None:
        if names:
            self.call(self.fs.rm, [self.key(n) for n in names], what=self.url)

    def list(self, prefix: str) -> dict[str, dict]:
        """Every object whose name (relative to this directory) starts with `prefix`."""
        try:
            found = self.fs.find(self.root, prefix=prefix, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        except Exception as e:
            raise self.loc.problem(e, self.where(prefix)) from None
        return {k[len(self.root) + 1:]: v for k, v in found.items() if k.startswith(self.root + "/")}

    def abort_uploads(self, names: Iterable[str]) -> None:
        """Abort the unfinished multipart uploads of these objects (a run killed while uploading
        them) and of no others: uploads are listed under the names' common prefix, and only those
        whose key is one of the names are aborted. Another client's upload in the same bucket,
        under this prefix too, is its own."""
        keys = {self.object_key(n) for n in names}
        if not keys:
            return
        listing = {"Bucket": self.bucket, "Prefix": os.path.commonprefix(sorted(keys))}
        while True:
            page = self.call(self.fs.call_s3, "list_multipart_uploads", **listing, what=self.url)
            for upload in page.get("Uploads") or []:
                if upload["Key"] in keys:
                    self.call(self.fs.call_s3, "abort_multipart_upload", Bucket=self.bucket, Key=upload["Key"],
                              UploadId=upload["UploadId"], what=f"{self.protocol}://{self.bucket}/{upload['Key']}")
            if not page.get("IsTruncated"):
                return
            listing.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])

    def size(self, name: str) -> int | None:
        info = self.info(name)
        return None if info is None else int(info["size"])

    def stamp(self, name: str) -> str | None:
        """Size and ETag: every PUT of new bytes gives a new ETag."""
        info = self.info(name)
        return None if info is None else f"{info['size']}:{_etag(info)}"

    def walk(self, prefix: str) -> Iterator[tuple[str, int, str]]:
        root = prefix.rstrip("/")
        for name, info in sorted(self.list(root).items()):
            if name == root or name.startswith(root + "/") or not root:
                yield name[len(root):].lstrip("/"), int(info["size"]), _etag(info)

    def range_checksum(self, name: str, offset: int, nbytes: int) -> str | None:
        digest = Hasher()
        size = self.size(name)
        if size is None or size < offset + nbytes:
            return None
        for start in range(offset, offset + nbytes, READ_PIECE):
            digest.update(self.read_range(name, start, min(start + READ_PIECE, offset + nbytes)))
        return digest.digest()

    def sync(self, prefix: str) -> None:
        pass  # an acknowledged PUT is durable

    def zarr_store(self, read_only: bool = False):
        return self.loc.zarr_store(read_only=read_only)

    def writer(self, name: str):
        """A file-like object that uploads `name` (multipart for large objects); the object
        appears only when it is closed, whole."""
        return self.call(self.fs.open, self.key(name), "wb", block_size=16 << 20, what=self.where(name))

    def assemble(self, name: str, pieces: Iterable["bytes | tuple[str, int, int]"]) -> None:
        """`name` becomes the concatenation of `pieces`, each bytes or a range (NAME, START,
        STOP) of another object of this directory, as one multipart upload that appears whole
        only once complete. Ranges are copied inside the storage service (UploadPartCopy) where
        they can make parts of their own; every part but the last must be at least 5 MiB, so
        bytes pieces and ranges under 5 MiB are gathered here and uploaded together, and a
        gathered run is topped up to 5 MiB by the head of the range that follows it (the whole
        range when what would be left of it is under 5 MiB). What passes through this process is
        so the bytes pieces, the ranges under 5 MiB and, per gathered run, under 10 MiB of the
        range after it. If taking a piece raises, the upload is aborted (invisible; the next
        run's `abort_uploads` drops it if this process could not) and the error goes on."""
        key = self.object_key(name)
        what = self.where(name)
        upload = self.call(self.fs.call_s3, "create_multipart_upload", Bucket=self.bucket, Key=key,
                           what=what)["UploadId"]
        parts: list[dict] = []
        gathered = bytearray()

        def send() -> None:
            etag = self.call(self.fs.call_s3, "upload_part", Bucket=self.bucket, Key=key, UploadId=upload,
                             PartNumber=len(parts) + 1, Body=bytes(gathered), what=what)["ETag"]
            parts.append({"PartNumber": len(parts) + 1, "ETag": etag})
            gathered.clear()

        def gather(data) -> None:
            gathered.extend(data)
            if len(gathered) >= ASSEMBLY_PART_BYTES:
                send()

        def copy(source: str, start: int, stop: int) -> None:
            count = math.ceil((stop - start) / MAX_COPY_BYTES)  # parts of <= 5 GiB, each >= 5 MiB
            for k in range(count):
                a, b = start + (stop - start) * k // count, start + (stop - start) * (k + 1) // count
                result = self.call(self.fs.call_s3, "upload_part_copy", Bucket=self.bucket, Key=key,
                                   UploadId=upload, PartNumber=len(parts) + 1,
                                   CopySource={"Bucket": self.bucket, "Key": self.object_key(source)},
                                   CopySourceRange=f"bytes={a}-{b - 1}", what=what)
                parts.append({"PartNumber": len(parts) + 1, "ETag": result["CopyPartResult"]["ETag"]})

        try:
            for piece in pieces:
                if not isinstance(piece, tuple):
                    gather(piece)
                    continue
                source, start, stop = piece
                head = max(0, MIN_PART_BYTES - len(gathered)) if gathered else 0
                if stop - start - head < MIN_PART_BYTES:  # too small for a part of its own
                    gather(self.read_range(source, start, stop))
                    continue
                if gathered:
                    gathered.extend(self.read_range(source, start, start + head))
                    send()
                copy(source, start + head, stop)
            if gathered or not parts:
                send()
            self.call(self.fs.call_s3, "complete_multipart_upload", Bucket=self.bucket, Key=key, UploadId=upload,
                      MultipartUpload={"Parts": parts}, what=what)
        except BaseException:
            try:
                self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=key, UploadId=upload)
            except Exception:
                pass  # the next run aborts it
            raise

    # -- the manifest's snapshot and journal ----------------------------------------------------

    def replace(self, name: str, data: bytes, keep: str | None = None) -> None:
        """`name` becomes `data`; the object it replaces is kept as `keep`. Conditional on the
        object being the one this process last saw (If-Match), or absent: a second writer is
        found here, not silently overwritten."""
        seen = self._seen.get(name)
        if seen is None:
            info = self.info(name)
            seen = info["ETag"] if info is not None else None
        if seen is None:
            etag = self.create(name, data)
        else:
            if keep:
                self._s3("copy_object", keep, CopySource={"Bucket": self.bucket,
                                                          "Key": self.object_key(name)})
            etag = self.replace_if(name, data, seen)
        if etag is None:
            raise _second_writer(self.where(name))
        self._seen[name] = etag

    def journal_read(self, name: str) -> bytes:
        segments = sorted((int(m.group(1)), n) for n in self.list(name + ".") if (m := SEGMENT.search(n))
                          and n.startswith(name + "."))
        self._segments[name] = (segments[-1][0] + 1) if segments else 0
        return b"".join(self.read(n) or b"" for _, n in segments)

    def journal_append(self, name: str, data: bytes) -> None:
        if name not in self._segments:
            self.journal_read(name)
        number = self._segments[name]
        if self.create(f"{name}.{number:08d}", data) is None:
            raise _second_writer(self.where(name))
        self._segments[name] = number + 1

    def journal_remove(self, name: str) -> None:
        self.delete_many([n for n in self.list(name + ".") if SEGMENT.search(n)])
        self._segments.pop(name, None)

    def journal_close(self, name: str | None = None) -> None:
        pass

    def journals(self, pattern: str) -> list[str]:
        import fnmatch

        return sorted({SEGMENT.sub("", n) for n in self.list("") if "/" not in n and SEGMENT.search(n)
                       and fnmatch.fnmatch(SEGMENT.sub("", n), pattern)})

    # -- one run at a time ---------------------------------------------------------------------

    @contextmanager
    def exclusive(self, name: str, log: Callable[[str], None] = lambda line: None) -> Iterator[Callable[[], None]]:
        """A lease (`RemoteLock`): no lock dies with its process here, so a killed run's lock
        is taken over once it has not been renewed for its lease."""
        lock = RemoteLock(self, name, log=log)
        lock.acquire()
        try:
            yield lock.check
        finally:
            lock.release()

    def lock_holder(self, name: str) -> "Lease | None":
        return RemoteLock.holder(self, name)


def _etag(info: dict) -> str:
    return info.get("ETag") or info.get("etag")


def _precondition(e: BaseException) -> bool:
    text = str(e)
    return "pre-condition" in text or "PreconditionFailed" in text or "412" in text


def _second_writer(where: str) -> DistSvcError:
    return DistSvcError(f"{where}: another dist-svc run wrote to this merge at the same time (a conditional write "
                        f"failed). Only one run may write an output; let the other finish (see `dist-svc status`), "
                        f"then rerun the same command if needed.")


@dataclass(frozen=True)
class Lease:
    """What an output's lock says of the run that holds it: whether it is alive (renewed within
    its lease), its lease in seconds (None for a lock that dies with its process, a `flock`),
    and how long ago it was last renewed (None where the service's clock cannot be read)."""

    alive: bool
    period: float | None
    age: float | None


def lease_period() -> float:
    """The lease a run takes on an object-storage output, in seconds (DIST_SVC_LOCK_LEASE)."""
    return float(os.environ.get("DIST_SVC_LOCK_LEASE", "10"))


class RemoteLock:
    """One run per output on object storage, where no lock dies with its process: a lease.

    The lock is an object (`.dist-svc.lock`) created only if absent, naming its run and its
    lease; while the run holds it, a thread rewrites it every LEASE / 4 seconds, each time
    conditional on its last version. A run that finds the lock watches it: if it changes, its
    holder is alive and the run is refused; if it stays the same for the holder's lease, its
    holder is gone (killed) and the run takes it over (conditional on that same version, so two
    runs taking over a dead one cannot both win). No clocks are compared for that. A holder that
    fails to renew (it lost the lease) stops at its next record (`check`). `holder` tells
    `status` whether the holder is alive without waiting: the lock's age by the storage
    service's clock against its lease."""

    def __init__(self, out: ObjectDir, name: str, lease: float | None = None, log=lambda line: None):
        self.out, self.name = out, name
        self.lease = lease if lease is not None else lease_period()
        self.log = log
        self.token = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex}".encode()
        self.etag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self, beat: int) -> bytes:
        return b"%s %d %g" % (self.token, beat, self.lease)

    def acquire(self) -> None:
        waited = False
        while True:
            self.etag = self.out.create(self.name, self._body(0))
            if self.etag:
                break
            info = self.out.info(self.name)
            if info is None:
                continue  # released meanwhile
            seen = info["ETag"]
            period = _declared(self.out.read(self.name)) or self.lease
            if not waited:
                self.log(f"{self.out.where(self.name)}: a lock is held; waiting up to {period:g} s to see whether "
                         f"its run is alive")
                waited = True
            renewed = _renewed(self.out, self.name, seen, period)
            if renewed:
                raise DistSvcError(f"another dist-svc run is merging into {self.out.url} (its lock "
                                   f"{self.out.where(self.name)} is renewed); wait for it to finish (see "
                                   f"`dist-svc status {self.out.url}`).")
            if renewed is None:
                continue  # released meanwhile
            self.etag = self.out.replace_if(self.name, self._body(0), seen)
            if self.etag:
                self.log(f"{self.out.where(self.name)}: took over the lock of a run that stopped")
                break
        self._thread = threading.Thread(target=self._renew, name="dist-svc-lock", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        beat = 0
        while not self._stop.wait(self.lease / 4):
            beat += 1
            try:
                etag = self.out.replace_if(self.name, self._body(beat), self.etag)
                if etag is None:
                    self.lost = "another run took the lock over"
                    return
                self.etag = etag
            except DistSvcError as e:
                self.lost = str(e)
                return

    def check(self) -> None:
        if self.lost:
            raise DistSvcError(f"{self.out.url}: this run lost its lock ({self.lost}); it stops here. Rerun the same "
                               f"command when no other run writes to it.")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost and (self.out.read(self.name) or b"").startswith(self.token):
            self.out.delete(self.name)

    @staticmethod
    def holder(out: ObjectDir, name: str) -> Lease | None:
        """The lease of the run that holds `name`, None if no lock is there. Alive while its age
        by the service's clock (whole seconds) is within its lease; where the service sends no
        Date, the lock is watched for up to one lease instead."""
        seen = out.age(name)
        if seen is None:
            return None
        etag, age = seen
        period = _declared(out.read(name)) or lease_period()
        if age is not None:
            return Lease(age <= period, period, age)
        renewed = _renewed(out, name, etag, period)
        return None if renewed is None else Lease(renewed, period, None)


def _declared(body: bytes | None) -> float | None:
    """The lease a lock object declares (`TOKEN BEAT LEASE`; None for a lock without one, or with
    no finite positive lease)."""
    try:
        lease = float(body.split()[2])
    except (AttributeError, IndexError, ValueError):
        return None
    return lease if math.isfinite(lease) and lease > 0 else None


def _renewed(out: ObjectDir, name: str, etag: str, period: float) -> bool | None:
    """Watch the lock `name`, last seen as `etag`, for up to `period` seconds: True once it is
    rewritten (its holder renews it), False if it stays the same, None if it is removed."""
    deadline = time.monotonic() + period
    while time.monotonic() < deadline:
        time.sleep(min(0.5, period / 8))
        now = out.info(name)
        if now is None:
            return None
        if now["ETag"] != etag:
            return True
    return False if out.info(name) is not None else None
