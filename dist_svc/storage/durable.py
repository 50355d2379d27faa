"""Durable writes, the same way everywhere: temp file, fsync, rename, fsync of the directory.

A file that appears under its final name is complete and on stable storage; a crash at any
instant leaves the previous state or the next one, never a mix.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

def local_path(path: str | Path, what: str = "path") -> Path:
    """A local path made absolute, symlinks resolved; a symlink loop is a clear error."""
    from dist_svc.errors import DistSvcError

    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as e:  # Python 3.11 raises RuntimeError for a loop
        raise DistSvcError(f"{what} {path}: cannot be resolved ({e}); fix the symlink or choose another path.") from None


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, durably. The temp file is `.NAME.tmp` beside it."""
    tmp = temp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def temp_path(path: Path) -> Path:
    """Where `atomic_write` stages `path`: a leftover of a killed write, ours to delete."""
    return path.with_name(f".{path.name}.tmp")


def sync_file(path: Path) -> None:
    """Make a file's data durable."""
    _sync(path, os.fdatasync)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it) durable."""
    _sync(path, os.fsync)


def sync_tree(root: Path) -> None:
    """Make every file and directory under `root` durable."""
    if root.is_file():
        sync_file(root)
        return
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            sync_file(Path(dirpath) / f)
        fsync_dir(Path(dirpath))


@contextmanager
def staged_directory(dst: Path, what: str) -> Iterator[Path]:
    """A directory that appears as `dst` whole or not at all: the block builds it under
    `.NAME.WHAT-PID` beside `dst` (a leftover of a killed run, ours to delete), which is then
    fsynced, renamed to `dst` and the parent fsynced; if the block raises, it is removed."""
    tmp = dst.with_name(f".{dst.name}.{what}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_dir(tmp)
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sync(path: Path, how) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        how(fd)
    finally:
        os.close(fd)
