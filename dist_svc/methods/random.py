"""Counter-based random numbers: the value at an element depends only on (seed, tensor name, task,
element index), never on how the tensor is split into blocks, on the executor or on the device.
That is what makes a DARE merge reproducible block by block and exactly resumable."""

from __future__ import annotations

import hashlib

import torch

_M32 = 0xFFFFFFFF


def _mix32_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32), in place on int64 tensors holding values < 2^32 (`tmp`:
    scratch of the same shape). In place because each pass over a fresh tensor would allocate,
    and fault in, a block's worth of memory: the hash is most of DARE's and DELLA's time."""
    torch.bitwise_right_shift(x, 16, out=tmp)
    x.bitwise_xor_(tmp).mul_(0x7FEB352D).bitwise_and_(_M32)
    torch.bitwise_right_shift(x, 15, out=tmp)
    x.bitwise_xor_(tmp).mul_(0x846CA68B).bitwise_and_(_M32)
    torch.bitwise_right_shift(x, 16, out=tmp)
    return x.bitwise_xor_(tmp)


def stream_key(seed: int, name: str, task: int) -> tuple[int, int]:
    digest = hashlib.sha256(f"{seed}\0{name}\0{task}".encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


def uniform(key: tuple[int, int], indices: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in [0, 1) (float64, 2^-32 resolution), one per flat element index."""
    lo, hi = key
    x = indices.to(torch.int64, copy=True)
    tmp = torch.empty_like(x)
    high = (x >> 32).bitwise_and_(_M32) if x.numel() and int(x.max()) >> 32 else None
    _mix32_(x.bitwise_and_(_M32).bitwise_xor_(lo), tmp)
    if high is not None:
        x.bitwise_xor_(high)
    _mix32_(x.bitwise_xor_(hi), tmp)
    _mix32_(x.bitwise_xor_(lo), tmp)
    return x.to(torch.float64).mul_(1.0 / 4294967296.0)
