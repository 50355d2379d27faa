"""The checksum of a tensor's bytes: what the manifest records for every finished tensor and what
a resume, `verify` and `convert` compare stored bytes with.

A digest names its algorithm: "blake3:<64 hex digits>". BLAKE3 hashes several times the bytes
per core that sha256 does (figures in docs/benchmarks.md), so hashing the output keeps up with a
disk or a GPU where sha256 was a stage of its own. Each worker hashes its own tensors on one
thread (the workers are the parallelism); BLAKE3 being a tree hash, one large tensor could also
be hashed on several threads with the same digest, which measured slower than one thread per
worker when every core already has a worker.

"sha256:<64 hex digits>" is still read and checked: finished zarr stores written before BLAKE3
carry one per array (`dist_svc.sha256`), and `convert` compares a source with it. Nothing new is
written with sha256. Small metadata (side files, the plan's fingerprint) keeps plain sha256: it
is not on any path where speed matters.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

ALGORITHM = "blake3"
ALGORITHMS = ("blake3", "sha256")
READ_PIECE = 64 << 20  # stored bytes are read back in pieces of this size to be hashed
_DIGEST = re.compile(f"({'|'.join(ALGORITHMS)}):[0-9a-f]{{64}}")


class Hasher:
    """An incremental checksum: `update` with bytes in order, then `digest`."""

    def __init__(self, algorithm: str = ALGORITHM):
        if algorithm == "blake3":
            import blake3

            self._hash = blake3.blake3()
        elif algorithm == "sha256":
            self._hash = hashlib.sha256()
        else:
            raise ValueError(f"unknown checksum algorithm '{algorithm}' (known: {', '.join(ALGORITHMS)})")
        self.algorithm = algorithm

    def update(self, data) -> None:
        self._hash.update(data)

    def digest(self) -> str:
        return f"{self.algorithm}:{self._hash.hexdigest()}"


def algorithm_of(digest: str) -> str:
    """The algorithm a digest was computed with (ValueError: not a digest this version reads)."""
    match = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if match is None:
        raise ValueError(f"'{str(digest)[:80]}' is not a checksum (expected one of {', '.join(ALGORITHMS)}:<64 hex digits>)")
    return match.group(1)


def is_digest(value) -> bool:
    """A checksum string this version can check."""
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def checksum(data, algorithm: str = ALGORITHM) -> str:
    """The digest of some bytes."""
    hasher = Hasher(algorithm)
    hasher.update(data)
    return hasher.digest()


def range_checksum(path: Path, offset: int, nbytes: int, algorithm: str = ALGORITHM) -> str | None:
    """The digest of a byte range of a file, read in READ_PIECE pieces; None when the file is
    missing or shorter than the range."""
    hasher = Hasher(algorithm)
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            left = nbytes
            while left:
                chunk = f.read(min(left, READ_PIECE))
                if not chunk:
                    return None
                hasher.update(chunk)
                left -= len(chunk)
    except FileNotFoundError:
        return None
    return hasher.digest()
