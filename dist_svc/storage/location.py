"""Where a checkpoint's files are: a local directory, or a prefix on object storage (s3://,
gs://, anything fsspec serves). Readers are written over one interface, `Location` (a Protocol,
below), and ask it what it can do through its capability flags, never which implementation it
is: `LocalLocation` and `RemoteLocation` are the only places that know local from remote.

Paths stay strings at the edge: only a local location holds a `Path`. Remote files are read by
ranges (`RemoteFile.read_into`: a read is split into parts fetched concurrently); endpoint and
credentials come from the environment the usual way (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_PROFILE, instance roles; GOOGLE_APPLICATION_CREDENTIALS for gs://), never from a config.
Every failure of the storage underneath is one `DistSvcError` paragraph naming the URL.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Iterator, Protocol, runtime_checkable

import numpy as np

from dist_svc.errors import DistSvcError

READ_PART_BYTES = 8 << 20  # a remote read is split into ranges of this size, fetched concurrently
HEADER_PROBE = 1 << 20  # the first request for a safetensors header (most headers fit)
MAP_WINDOW = 32 * 1024 * 1024  # bytes of a local file mapped at once by a column read
# A client that gives up in seconds, not minutes, when the endpoint does not answer.
S3_CONFIG = {"connect_timeout": 10, "read_timeout": 120, "retries": {"max_attempts": 4, "mode": "standard"}}


def is_url(text: str | Path) -> bool:
    return isinstance(text, str) and "://" in text and not text.startswith("file://")


class File(Protocol):
    """One file of a checkpoint, read by position (`Location.file`)."""

    name: str  # its name in its location
    where: str  # its path or URL, for messages

    @property
    def size(self) -> int: ...

    def identity(self) -> dict:
        """What changes when the file is written again (name, size, and a modification time
        or version), JSON-able: part of a merge's fingerprint."""

    def read(self, offset: int, nbytes: int) -> bytes: ...

    def read_into(self, offset: int, buf) -> None:
        """`len(buf)` bytes from `offset` into `buf`; a short file is an error."""

    def read_columns(self, offset: int, shape: tuple[int, ...], itemsize: int, rows: range, cols: range) -> np.ndarray:
        """rows x cols of a row-major array of `shape` stored at `offset`, as unsigned integers
        of the element's size (the caller views them as its dtype)."""

    def close(self) -> None: ...


@runtime_checkable
class Location(Protocol):
    """Where a checkpoint's files are (the read side of storage). `location()` makes one from a
    path or URL. What an implementation can do is declared by its capability flags:

    - `file_paths`: its files are paths on this machine's filesystem (`path`), which libraries
      that open files themselves (torch.load, memory maps) can read. Else `path` is None.
    - `ordered_versions`: the version `walk` gives a file is its modification time, which only
      grows: the newest of a set of files says whether any of them changed. Else versions are
      opaque (ETags), and a set's identity must name every one.
    - `cheap_lookups`: asking whether one file exists costs no round trip (a local stat), so a
      reader asks file by file; else it lists a prefix once and looks in the listing.
    """

    file_paths: ClassVar[bool]
    ordered_versions: ClassVar[bool]
    cheap_lookups: ClassVar[bool]
    url: str  # the path or URL, as messages and identities name it
    path: Path | None  # where `file_paths`: the local path

    def exists(self) -> bool: ...

    def is_dir(self) -> bool: ...

    def is_file(self, name: str = "") -> bool:
        """Whether `name` (a path relative to this location; "" for itself) is a file."""

    def names(self) -> list[str]:
        """The files directly in the directory, sorted."""

    def where(self, name: str = "") -> str:
        """`name`'s path or URL, for messages."""

    def file(self, name: str = "") -> File: ...

    def read_bytes(self, name: str) -> bytes | None:
        """A whole (small) file; None when absent."""

    def child(self, name: str) -> "Location": ...

    def parent(self) -> "Location": ...

    def walk(self, prefix: str) -> Iterator[tuple[str, int, object]]:
        """(key relative to `prefix`, size, version) of every file under it (see
        `ordered_versions`)."""

    def zarr_store(self, read_only: bool = True):
        """What zarr opens this location with."""

    def problem(self, e: BaseException, what: str) -> DistSvcError | None:
        """A failure of the storage service under `what`, as one paragraph naming it; None where
        no service stands between this process and the bytes (a local filesystem: its errors
        are the file's own, for the reader to explain)."""


def location(source: "str | Path | Location") -> Location:
    """The location of a checkpoint named by a local path or a URL (a `Location` is itself)."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    if isinstance(source, str) and source.startswith("file://"):
        source = source.removeprefix("file://")
    if is_url(source):
        return RemoteLocation(str(source))
    return LocalLocation(Path(source))


# -- local -----------------------------------------------------------------------------------------


class LocalFile:
    """A local file read by position: `preadv` straight into the caller's buffer; columns are
    copied out of mappings of at most MAP_WINDOW bytes of whole rows, each unmapped before the
    next, so the pages mapped at any moment stay bounded."""

    def __init__(self, path: Path):
        self.path = path
        self.name = path.name
        self.where = str(path)
        self._fd: int | None = None
        self._stat = None
        self._lock = threading.Lock()  # workers (threads) of one process share a checkpoint

    def stat(self) -> os.stat_result:
        if self._stat is None:
            try:
                self._stat = os.stat(self.path)
            except OSError as e:
                raise DistSvcError(f"cannot read {self.path}: {e.strerror}.") from None
        return self._stat

    @property
    def size(self) -> int:
        return self.stat().st_size

    def identity(self) -> dict:
        """Name, size and modification time: a file rewritten in place gets a new one."""
        st = self.stat()
        return {"file": self.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def read(self, offset: int, nbytes: int) -> bytes:
        buf = bytearray(nbytes)
        self.read_into(offset, buf)
        return bytes(buf)

    def read_into(self, offset: int, buf) -> None:
        fd = self._fd
        if fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
                fd = self._fd
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise OSError(f"unexpected end of file at byte {offset + done}; the file was truncated")
            done += n

    def read_columns(self, offset: int, shape: tuple[int, ...], itemsize: int, rows: range, cols: range) -> np.ndarray:
        """rows x cols of a row-major array of `shape` stored at `offset`, as unsigned integers of
        the element's size (the caller views them as its dtype)."""
        np_dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[itemsize]
        row_bytes = math.prod(shape[1:]) * itemsize
        out = np.empty((len(rows), len(cols), *shape[2:]), dtype=np_dtype)
        per_window = max(1, MAP_WINDOW // max(row_bytes, 1))
        for start in range(rows.start, rows.stop, per_window):
            stop = min(start + per_window, rows.stop)
            window = np.memmap(self.path, dtype=np_dtype, mode="r", offset=offset + start * row_bytes,
                               shape=(stop - start, *shape[1:]))
            out[start - rows.start:stop - rows.start] = window[:, cols.start:cols.stop]
            del window  # unmapped here
        return out

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class LocalLocation:
    """A checkpoint on a local filesystem: a directory, or one file."""

    file_paths = True
    ordered_versions = True
    cheap_lookups = True

    def __init__(self, path: Path):
        self.path = Path(path)
        self.url = str(self.path)

    def __str__(self) -> str:
        return self.url

    def exists(self) -> bool:
        return self.path.exists()

    def is_dir(self) -> bool:
        return self.path.is_dir()

    def is_file(self, name: str = "") -> bool:
        return (self.path / name if name else self.path).is_file()

    def names(self) -> list[str]:
        """The files directly in the directory, sorted."""
        return sorted(p.name for p in self.path.iterdir() if p.is_file()) if self.path.is_dir() else []

    def where(self, name: str = "") -> str:
        return str(self.path / name) if name else self.url

    def file(self, name: str = "") -> LocalFile:
        return LocalFile(self.path / name if name else self.path)

    def read_bytes(self, name: str) -> bytes | None:
        path = self.path / name
        try:
            return path.read_bytes() if path.is_file() else None
        except OSError as e:
            raise DistSvcError(f"cannot read {path}: {e.strerror}.") from None

    def child(self, name: str) -> "LocalLocation":
        return LocalLocation(self.path / name)

    def parent(self) -> "LocalLocation":
        return LocalLocation(self.path.parent)

    def walk(self, prefix: str) -> Iterator[tuple[str, int, int]]:
        """(key relative to `prefix`, size, modification time in ns) of every file under it."""
        root = self.path / prefix
        if root.is_file():
            st = root.stat()
            yield "", st.st_size, st.st_mtime_ns
            return
        for dirpath, _, filenames in os.walk(root):
            for f in filenames:
                full = os.path.join(dirpath, f)
                st = os.stat(full)
                yield os.path.relpath(full, root), st.st_size, st.st_mtime_ns

    def zarr_store(self, read_only: bool = True):
        return str(self.path)

    def problem(self, e: BaseException, what: str) -> None:
        return None  # no service in between: the reader explains what the file's error means


# -- remote ----------------------------------------------------------------------------------------


class RemoteFile:
    """One object read by ranges. A read is split into parts of READ_PART_BYTES fetched concurrently
    (fsspec's `cat_ranges`); columns of a matrix are strided, so a column read first copies the
    tensor's bytes once into a local scratch file and reads from there."""

    def __init__(self, loc: "RemoteLocation", key: str, info: dict | None = None):
        self.loc = loc
        self.key = key
        self.name = key.rsplit("/", 1)[-1]
        self.where = loc.protocol_url(key)
        self._info = info
        self._scratch: tuple[int, int, LocalFile, str] | None = None  # (offset, nbytes, file, dir)
        self._lock = threading.Lock()  # one scratch copy at a time (threads share a checkpoint)

    @property
    def info(self) -> dict:
        if self._info is None:
            self._info = self.loc.call(self.loc.fs.info, self.key, what=self.where)
        return self._info

    @property
    def size(self) -> int:
        return int(self.info["size"])

    def identity(self) -> dict:
        """Name, size and the object's version (ETag, else its modification time): an object
        written again gets a new one."""
        info = self.info
        version = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("generation")
        if version is None:
            modified = info.get("LastModified") or info.get("mtime") or info.get("updated")
            version = str(modified)
        return {"file": self.name, "size": self.size, "version": str(version).strip('"')}

    def read(self, offset: int, nbytes: int) -> bytes:
        buf = bytearray(nbytes)
        self.read_into(offset, buf)
        return bytes(buf)

    def read_into(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        if not len(view):
            return
        starts = list(range(offset, offset + len(view), READ_PART_BYTES))
        ends = [min(s + READ_PART_BYTES, offset + len(view)) for s in starts]
        parts = self.loc.call(self.loc.fs.cat_ranges, [self.key] * len(starts), starts, ends, what=self.where)
        for start, end, part in zip(starts, ends, parts):
            if isinstance(part, BaseException):
                raise self.loc.problem(part, self.where)
            if len(part) != end - start:
                raise DistSvcError(f"{self.where}: got {len(part)} bytes at offset {start}, expected {end - start}; "
                                   f"the object is shorter than its header says (changed while reading?).")
            view[start - offset:end - offset] = part

    def read_columns(self, offset: int, shape: tuple[int, ...], itemsize: int, rows: range, cols: range) -> np.ndarray:
        with self._lock:
            return self._columns(offset, shape, itemsize, rows, cols)

    def _columns(self, offset: int, shape: tuple[int, ...], itemsize: int, rows: range, cols: range) -> np.ndarray:
        nbytes = math.prod(shape) * itemsize
        if self._scratch is None or self._scratch[:2] != (offset, nbytes):
            self._drop_scratch()
            folder = tempfile.mkdtemp(prefix="dist-svc-columns-")
            path = Path(folder) / "tensor"
            with open(path, "wb") as f:
                for start in range(0, nbytes, 64 << 20):
                    f.write(self.read(offset + start, min(64 << 20, nbytes - start)))
            self._scratch = (offset, nbytes, LocalFile(path), folder)
        return self._scratch[2].read_columns(0, shape, itemsize, rows, cols)

    def _drop_scratch(self) -> None:
        if self._scratch is not None:
            import shutil

            self._scratch[2].close()
            shutil.rmtree(self._scratch[3], ignore_errors=True)
            self._scratch = None

    def close(self) -> None:
        with self._lock:
            self._drop_scratch()


class RemoteLocation:
    """A prefix (or one object) on object storage, through fsspec."""

    file_paths = False
    ordered_versions = False
    cheap_lookups = False
    path = None

    def __init__(self, url: str, _fs=None):
        self.url = url.rstrip("/")
        self.protocol = self.url.split("://", 1)[0]
        if _fs is None:
            _fs, _ = self._filesystem()
        self.fs = _fs
        self.root = self.fs._strip_protocol(self.url)
        self._listing: dict[str, dict] | None = None

    def __str__(self) -> str:
        return self.url

    def __getstate__(self):  # a filesystem object is rebuilt, not pickled (Ray actors)
        return {"url": self.url}

    def __setstate__(self, state):
        self.__init__(state["url"])

    def _filesystem(self):
        try:
            import fsspec
        except ImportError:
            raise DistSvcError(f"{self.url}: reading object storage needs fsspec and its driver for "
                               f"{self.protocol}://: pip install 'dist-svc[s3]' (or [gcs]).") from None
        options = {"config_kwargs": dict(S3_CONFIG)} if self.protocol in ("s3", "s3a") else {}
        try:
            return fsspec.core.url_to_fs(self.url, **options)
        except ImportError as e:
            extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(self.protocol)
            hint = f"pip install 'dist-svc[{extra}]'" if extra else f"install fsspec's driver for {self.protocol}://"
            raise DistSvcError(f"{self.url}: reading {self.protocol}:// needs a driver that is not installed "
                               f"({e}); {hint}.") from None
        except ValueError as e:
            raise DistSvcError(f"{self.url}: not a storage URL fsspec knows ({e}).") from None

    def protocol_url(self, key: str) -> str:
        return f"{self.protocol}://{key}"

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def where(self, name: str = "") -> str:
        return self.protocol_url(self._key(name))

    # -- errors ------------------------------------------------------------------------------------

    def problem(self, e: BaseException, what: str) -> DistSvcError:
        """One paragraph for a failure of the storage under `what`."""
        name = type(e).__name__
        text = str(e)[:300]
        if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError") or \
                "Unable to locate credentials" in text:
            return DistSvcError(
                f"{what}: no credentials for {self.protocol}:// were found ({text}). Set them the usual way: "
                f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials, or run "
                f"where an instance role or workload identity provides them (see cluster/README.md); a merge "
                f"config never holds credentials.")
        if isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text or "403" in text:
            return DistSvcError(f"{what}: access denied ({text}). Check that these credentials may read it.")
        if isinstance(e, FileNotFoundError) and "bucket does not exist" in text:
            return DistSvcError(f"{what}: the bucket does not exist ({text}). Check the URL and the endpoint "
                                f"(AWS_ENDPOINT_URL={os.environ.get('AWS_ENDPOINT_URL', 'unset')}).")
        if isinstance(e, FileNotFoundError):
            return DistSvcError(f"{what}: no such object or prefix. Check the URL.")
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError",
                    "ServerDisconnectedError", "ReadTimeoutError", "ConnectionClosedError") or \
                isinstance(e, (ConnectionError, TimeoutError)):
            endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
            at = f" at {endpoint} (AWS_ENDPOINT_URL)" if endpoint else ""
            return DistSvcError(f"{what}: the storage service{at} cannot be reached ({name}: {text}). Check the "
                                f"network and the endpoint, then rerun the same command.")
        if isinstance(e, DistSvcError):
            return e
        return DistSvcError(f"{what}: the storage service failed ({name}: {text}). Rerun the same command; "
                            f"if it persists, check the storage.")

    def call(self, fn, *args, what: str | None = None, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DistSvcError:
            raise
        except Exception as e:
            raise self.problem(e, what or self.url) from None

    # -- the interface readers use ---------------------------------------------------------------

    def _list(self) -> dict[str, dict]:
        """The objects directly under the prefix (listed once)."""
        if self._listing is None:
            try:
                entries = self.fs.ls(self.root, detail=True, refresh=True)  # as it is now, not as cached
            except FileNotFoundError as e:
                if "bucket" in str(e):
                    raise self.problem(e, self.url) from None
                entries = []
            except Exception as e:
                raise self.problem(e, self.url) from None
            self._listing = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry
                             for entry in entries if entry.get("type") == "file" and entry["name"] != self.root}
        return self._listing

    def exists(self) -> bool:
        return bool(self._list()) or self.is_file()

    def is_dir(self) -> bool:
        return bool(self._list())

    def is_file(self, name: str = "") -> bool:
        if name and "/" not in name:
            return name in self._list()
        try:
            return self.fs.info(self._key(name)).get("type") == "file"
        except FileNotFoundError:
            return False
        except Exception as e:
            raise self.problem(e, self.url) from None

    def names(self) -> list[str]:
        return sorted(self._list())

    def file(self, name: str = "") -> RemoteFile:
        return RemoteFile(self, self._key(name), self._list().get(name) if name else None)

    def read_bytes(self, name: str) -> bytes | None:
        if not self.is_file(name):
            return None
        return self.call(self.fs.cat_file, self._key(name), what=self.where(name))

    def child(self, name: str) -> "RemoteLocation":
        return RemoteLocation(f"{self.url}/{name}", _fs=self.fs)

    def parent(self) -> "RemoteLocation":
        return RemoteLocation(self.url.rsplit("/", 1)[0], _fs=self.fs)

    def walk(self, prefix: str) -> Iterator[tuple[str, int, str]]:
        """(key relative to `prefix`, size, version) of every object under it."""
        root = self._key(prefix)
        found = self.call(self.fs.find, root, detail=True, refresh=True, what=self.where(prefix))
        for key, info in sorted(found.items()):
            version = info.get("ETag") or info.get("LastModified") or info.get("mtime")
            yield key[len(root):].lstrip("/"), int(info["size"]), str(version).strip('"')

    def zarr_store(self, read_only: bool = True):
        from zarr.storage import FsspecStore

        options = {"config_kwargs": dict(S3_CONFIG)} if self.protocol in ("s3", "s3a") else {}
        return self.call(FsspecStore.from_url, self.url, storage_options=options, read_only=read_only)


# -- the files of a checkpoint -----------------------------------------------------------------------


def side_file(loc, name: str) -> bytes | None:
    """A non-tensor file (config.json, tokenizer files) of the checkpoint at `loc`: in its
    folder, or beside it when `loc` is a single file; None when absent."""
    folder = loc if loc.is_dir() else loc.parent()
    return folder.read_bytes(name)


def quote(value, limit: int = 80) -> str:
    """A value from a file, quoted for a message and cut short: crafted input must not be able
    to make an error message huge."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...(cut)"


def _weight_map(raw: bytes | None, where: str) -> dict[str, str]:
    """An index's tensor -> shard file map, each shard a plain file name beside the index."""
    try:
        weight_map = json.loads(raw)["weight_map"]
    except (TypeError, ValueError, KeyError, RecursionError):
        raise DistSvcError(f"{where}: not a valid index (expected a JSON object with 'weight_map').") from None
    if not isinstance(weight_map, dict):
        raise DistSvcError(f"{where}: 'weight_map' is {type(weight_map).__name__}, not a mapping of tensor names "
                           f"to shard files; the index is corrupt. Re-download or re-save the checkpoint.")
    for name, fname in weight_map.items():
        if not isinstance(fname, str) or not fname or "/" in fname or "\\" in fname or fname in (".", ".."):
            raise DistSvcError(f"{where}: tensor {quote(name)} is mapped to {quote(fname)}, which is not the "
                               f"name of a shard file beside the index; the index is corrupt.")
    return weight_map


def discover(loc, index_name: str, single: str, suffixes: tuple[str, ...], kind: str) -> tuple[list[str], dict | None]:
    """The files of a checkpoint at `loc` (a directory, or one file), as names in `loc`: the
    shards its index (`index_name`) names, else `single`, else every file with one of `suffixes`.
    Also the index's weight map, if there is one. Shared by the safetensors and torch readers."""
    if not loc.is_dir():
        if loc.is_file() and str(loc).endswith(suffixes):
            return [""], None
        raise DistSvcError(f"{loc}: no such checkpoint directory (nor a {' or '.join(suffixes)} file). Check the "
                           f"path; a Hugging Face Hub model is named org/name[@revision] or hf://org/name and is "
                           f"downloaded to the Hub cache (or use a downloaded copy's directory).")
    names = set(loc.names())
    if index_name in names:
        weight_map = _weight_map(loc.read_bytes(index_name), loc.where(index_name))
        files = sorted(set(weight_map.values()))
        for f in files:
            if f not in names:
                raise DistSvcError(f"{loc.where(index_name)} names shard {f}, which is missing from {loc}.")
        return files, weight_map
    if single in names:
        return [single], None
    files = sorted(n for n in names if n.endswith(suffixes))
    if not files:
        raise DistSvcError(f"{loc}: no {kind} files (expected {index_name} with shards, or {single}).")
    return files, None


def check_index(weight_map: dict | None, holder: dict[str, str], where: str) -> None:
    """The index maps exactly the tensors the shards hold, each to the shard that holds it
    (`holder`: tensor -> file name)."""
    if weight_map is None:
        return
    for name, fname in weight_map.items():
        if holder.get(name) != fname:
            raise DistSvcError(f"{where}: tensor {quote(name)} is mapped to {fname}, "
                               f"but that file does not hold it. The index and shards disagree.")
    for name in holder:
        if name not in weight_map:
            raise DistSvcError(f"{where}: tensor {quote(name)} is in {holder[name]} but not in the index.")



@contextmanager
def storage_errors(loc, what: str):
    """Failures of remote storage inside the block become one paragraph naming `what`."""
    try:
        yield
    except DistSvcError:
        raise
    except Exception as e:
        problem = loc.problem(e, what)
        if problem is None:
            raise
        raise problem from None
