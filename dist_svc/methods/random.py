"""Counter-based random numbers: the value at an element depends only on (seed, tensor name, task,
element index), never on how the tensor is split into blocks, on the executor or on the device.
That is what makes a DARE merge reproducible block by block and exactly resumable."""

from __future__ import annotations

import hashlib

import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32), on int64 tensors holding values < 2^32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def stream_key(seed: int, name: str, task: int) -> tuple[int, int]:
    digest = hashlib.sha256(f"{seed}\0{name}\0{task}".encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


def uniform(key: tuple[int, int], indices: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in [0, 1) (float64, 2^-32 resolution), one per flat element index."""
    lo, hi = key
    idx = indices.to(torch.int64)
    x = _mix32(((idx & _M32) ^ lo) & _M32)
    x = _mix32(x ^ ((idx >> 32) & _M32) ^ hi)
    x = _mix32(x ^ lo)
    return x.to(torch.float64) * (1.0 / 4294967296.0)
