"""Reading a unit's inputs block by block: which blocks, the reads, the finite check and the
move to the compute device.

A tensor is streamed in blocks of rows (of columns, for a wide matrix calibrated on its smaller
side), never loaded whole unless a method needs it so. Each block of each input is read into
memory of its own, checked for NaN/Inf, moved to the device in its stored dtype and widened
there to the compute dtype; task vectors `ft_i - base` are formed in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dist_svc.errors import DistSvcError
from dist_svc.storage.types import Adapter, Checkpoint

BLOCK_ELEMENTS = 1 << 23  # ~8M elements (32 MiB in float32) per input block


@dataclass(frozen=True)
class Block:
    """A range of rows of the tensor (or of columns, when `transposed`)."""

    start: int
    stop: int
    transposed: bool


class BlockReader:
    def __init__(self, base: Checkpoint, models: list[Checkpoint], device: torch.device,
                 compute_dtype: torch.dtype, block_elements: int = BLOCK_ELEMENTS):
        self.base, self.models = base, models
        self.device = device
        self.compute_dtype = compute_dtype
        self.block_elements = block_elements

    def blocks(self, name: str, shape: tuple[int, ...], transposed: bool = False) -> list[Block]:
        """Blocks of about `block_elements`, aligned to the inputs' stored chunks (zarr), so that
        each chunk is read once."""
        if not shape:
            return [Block(0, 1, False)]
        length = shape[1] if transposed else shape[0]
        if not math.prod(shape):  # no bytes at all, whatever its extents: one empty block
            return [Block(0, length, transposed)]
        per_index = math.prod(shape) // length
        step = max(1, self.block_elements // max(per_index, 1))
        extent = max(c.chunk_extent(name, 1 if transposed else 0) for c in (self.base, *self.models))
        step = max(extent, step // extent * extent)
        return [Block(i, min(i + step, length), transposed) for i in range(0, length, step)]

    @staticmethod
    def whole(shape: tuple[int, ...]) -> Block:
        return Block(0, shape[0] if shape else 1, False)

    def inputs(self, name: str, block: Block) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The base block and the task vectors `ft_i - base` of one block, in compute dtype on
        the device, oriented (transposed for a column block)."""
        base = self._read(self.base, name, block)
        return base, [self._task_vector(model, name, block, base) for model in self.models]

    def _task_vector(self, model: Checkpoint, name: str, block: Block, base: torch.Tensor) -> torch.Tensor:
        """`model - base` on this block. An adapter's change is exact (a LoRA's scale * B @ A of
        this block, in float64 rounded once), never a difference of rounded weights."""
        if isinstance(model, Adapter):
            rows, cols = self._slices(model.inner.tensors[name], block)
            delta = model.delta(name, rows, cols, self.compute_dtype)
            if delta is not None:
                tau = self._finite(self._to_device(delta.T if block.transposed else delta), name,
                                   f"the adapter {model.source}")
                if model.inner is not self.base:  # MODEL+ADAPTER on another model: its own task vector too
                    tau += self._read(model.inner, name, block).sub_(base)
                return tau
        # In place: every read is a buffer of its own (readers never hand out file mappings).
        return self._read(model, name, block).sub_(base)

    @staticmethod
    def _slices(info, block: Block) -> tuple[slice | None, slice | None]:
        if not info.shape:
            return None, None
        span = slice(block.start, block.stop)
        return (None, span) if block.transposed else (span, None)

    def _read(self, checkpoint: Checkpoint, name: str, block: Block) -> torch.Tensor:
        info = checkpoint.tensors[name]
        rows, cols = self._slices(info, block)
        raw = checkpoint.read(name, rows=rows, cols=cols)
        return self._finite(self._to_device(raw.T if block.transposed else raw), name, info.where)

    def _to_device(self, raw: torch.Tensor) -> torch.Tensor:
        # To the device in the stored dtype, then widened there: `.to(cuda, float32)` of a bf16
        # tensor widens on the CPU first and moves twice the bytes (2 GB/s measured on an H100
        # host), which made it the limit of a GPU merge.
        return raw.to(self.device).to(self.compute_dtype) if self.device.type == "cuda" \
            else raw.to(self.compute_dtype)

    @staticmethod
    def _finite(tensor: torch.Tensor, name: str, where: str) -> torch.Tensor:
        # A NaN or Inf anywhere makes the sum non-finite; only then is each element checked
        # (a finite tensor whose sum overflows is not refused).
        if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
            raise DistSvcError(f"tensor '{name}' in {where} contains NaN or Inf values; "
                               f"merging it would spread them. Repair or replace that checkpoint.")
        return tensor

    def close(self) -> None:
        self.base.close()
        for m in self.models:
            m.close()


def flat_indices(shape: tuple[int, ...], block: Block, device: torch.device) -> torch.Tensor:
    """The index of each element of a block in the flattened whole tensor, in the block's own
    (oriented) layout: what counter-based random numbers are keyed by."""
    if not shape:
        return torch.zeros((), dtype=torch.int64, device=device)
    if block.transposed:  # columns start..stop of an m x n matrix, as (stop - start) x m
        m, n = shape
        cols = torch.arange(block.start, block.stop, dtype=torch.int64, device=device)
        return cols[:, None] + torch.arange(m, dtype=torch.int64, device=device)[None, :] * n
    per_row = math.prod(shape[1:])
    flat = torch.arange(block.start * per_row, block.stop * per_row, dtype=torch.int64, device=device)
    return flat.view(block.stop - block.start, *shape[1:])
