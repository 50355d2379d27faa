"""Reading a unit's inputs block by block: which blocks, the reads, the finite check and the
move to the compute device.

A tensor is streamed in blocks of rows (of columns, for a wide matrix calibrated on its smaller
side), never loaded whole unless a method needs it so. Each block of each input is read into
memory of its own, checked for NaN/Inf, moved to the device in its stored dtype and widened
there to the compute dtype. Each input is read under its own name in its own checkpoint (a
frankenmerge's output layer 30 may be layer 12 of one model). An input that is an adapter of the
unit's base (a LoRA) also gives its exact change from the base (`Inputs.deltas`: scale * B @ A
of the block, in float64 rounded once), which the worker uses as its task vector instead of a
difference of rounded weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dist_svc.errors import DistSvcError
from dist_svc.storage.types import Adapter, Checkpoint

if TYPE_CHECKING:
    from dist_svc.plan import Unit

BLOCK_ELEMENTS = 1 << 23  # ~8M elements (32 MiB in float32) per input block


@dataclass(frozen=True)
class Block:
    """A range of rows of the tensor (or of columns, when `transposed`)."""

    start: int
    stop: int
    transposed: bool


class BlockReader:
    """Reads the inputs of units: `checkpoints` are the merge's, in the config's order; a unit
    names, per input, the checkpoint and the tensor's name there."""

    def __init__(self, checkpoints: list[Checkpoint], device: torch.device, compute_dtype: torch.dtype,
                 block_elements: int = BLOCK_ELEMENTS):
        self.checkpoints = checkpoints
        self.device = device
        self.compute_dtype = compute_dtype
        self.block_elements = block_elements

    def blocks(self, unit: "Unit", transposed: bool = False) -> list[Block]:
        """Blocks of about `block_elements`, aligned to the inputs' stored chunks (zarr), so that
        each chunk is read once."""
        shape = unit.shape
        if not shape:
            return [Block(0, 1, False)]
        length = shape[1] if transposed else shape[0]
        if not math.prod(shape):  # no bytes at all, whatever its extents: one empty block
            return [Block(0, length, transposed)]
        per_index = math.prod(shape) // length
        step = max(1, self.block_elements // max(per_index, 1))
        extent = max(self.checkpoints[s.checkpoint].chunk_extent(s.tensor, 1 if transposed else 0)
                     for s in unit.inputs)
        step = max(extent, step // extent * extent)
        return [Block(i, min(i + step, length), transposed) for i in range(0, length, step)]

    @staticmethod
    def whole(shape: tuple[int, ...]) -> Block:
        return Block(0, shape[0] if shape else 1, False)

    def read(self, unit: "Unit", block: Block | None) -> "Inputs":
        """Every input's block (`None`: the whole tensor, whatever its length in each input), in
        compute dtype on the device, oriented (transposed for a column block); each in memory of
        its own (readers never hand out file mappings), so callers may change them in place. An
        adapter of the base input gives its exact change (`deltas`) and, as its weights, the base
        block plus that change (the base is not read twice)."""
        base = unit.base
        base_source = unit.inputs[base] if base is not None else None
        tensors: list[torch.Tensor | None] = []
        deltas: dict[int, torch.Tensor] = {}
        for i, s in enumerate(unit.inputs):
            checkpoint = self.checkpoints[s.checkpoint]
            if (base_source is not None and i != base and isinstance(checkpoint, Adapter)
                    and checkpoint.inner is self.checkpoints[base_source.checkpoint] and s.tensor == base_source.tensor):
                delta = self._delta(checkpoint, s.tensor, block)
                if delta is not None:
                    deltas[i] = delta
                    tensors.append(None)
                    continue
            tensors.append(self._read(checkpoint, s.tensor, block))
        for i, delta in deltas.items():
            tensors[i] = tensors[base] + delta
        return Inputs(tensors, deltas)

    def _delta(self, adapter: Adapter, name: str, block: Block | None) -> torch.Tensor | None:
        shape = adapter.inner.tensors[name].shape
        span = None if block is None or not shape else slice(block.start, block.stop)
        transposed = block is not None and block.transposed and bool(shape)
        delta = adapter.delta(name, None if transposed else span, span if transposed else None, self.compute_dtype)
        if delta is None:
            return None
        return self._finite(self._to_device(delta.T if transposed else delta), name, f"the adapter {adapter.source}")

    def _read(self, checkpoint: Checkpoint, name: str, block: Block | None) -> torch.Tensor:
        info = checkpoint.tensors[name]
        if not info.shape or block is None:
            raw = checkpoint.read(name)
        elif block.transposed:
            raw = checkpoint.read(name, cols=slice(block.start, block.stop)).T
        else:
            raw = checkpoint.read(name, rows=slice(block.start, block.stop))
        return self._finite(self._to_device(raw), name, info.where)

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
        for c in self.checkpoints:
            c.close()


class Inputs(list):
    """A unit's input blocks (weights), and by position the exact changes of the inputs that are
    adapters of its base (their task vectors)."""

    def __init__(self, tensors: list[torch.Tensor], deltas: dict[int, torch.Tensor]):
        super().__init__(tensors)
        self.deltas = deltas


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
