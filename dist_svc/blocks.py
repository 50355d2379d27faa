"""Reading a unit's inputs block by block: which blocks, the reads, the finite check and the
move to the compute device.

A tensor is streamed in blocks of rows (of columns, for a wide matrix calibrated on its smaller
side), never loaded whole unless a method needs it so. Each block of each input is read into
memory of its own, checked for NaN/Inf, moved to the device in its stored dtype and widened
there to the compute dtype. Each input is read under its own name in its own checkpoint (a
frankenmerge's output layer 30 may be layer 12 of one model). An input that is an adapter of the
unit's base (a LoRA) is not read as a second copy of the base: its block is the base's block plus
its change (scale * B @ A, float64), rounded once to the adapter's stored dtype, the same weights
`read()` gives for any adapted model (and mergekit's `MODEL+LORA`, merged in the model's dtype).
"""

from __future__ import annotations

import collections
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from dist_svc.errors import DistSvcError
from dist_svc.storage.types import DTYPES, Adapter, Checkpoint

if TYPE_CHECKING:
    from dist_svc.plan import Unit

# 4M elements per block (16 MiB in float32): below glibc's largest mmap threshold, so that a
# block's buffers come back from the heap for the next block instead of being mapped and faulted
# in afresh (a fresh 32 MiB buffer costs 14 ms of page faults; a reused one, 1 ms: setup_process).
BLOCK_ELEMENTS = 1 << 22
READ_AHEAD = 1  # blocks read ahead of the one being computed


def block_length(unit: "Unit", transposed: bool, block_elements: int = BLOCK_ELEMENTS) -> int:
    """Rows (columns, when `transposed`) per block: about `block_elements` elements, a whole
    number of the inputs' stored chunks (`Unit.chunks`), at least one."""
    shape = unit.shape
    if not shape:
        return 1
    length = max(shape[1] if transposed else shape[0], 1)
    per_index = max(math.prod(shape) // length, 1)
    step = max(1, block_elements // per_index)
    extent = max(unit.chunks[1 if transposed else 0], 1)
    return max(extent, step // extent * extent)


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
                 block_elements: int = BLOCK_ELEMENTS, read_ahead: int = READ_AHEAD):
        self.checkpoints = checkpoints
        self.device = device
        self.compute_dtype = compute_dtype
        self.block_elements = block_elements
        self.read_ahead = read_ahead
        self.seconds = 0.0  # spent waiting for reads
        self._pool: ThreadPoolExecutor | None = None
        self._streams = threading.local()  # a reading thread's CUDA stream

    def stream(self, unit: "Unit", blocks: Sequence[Block]) -> Iterator[tuple[Block, list[torch.Tensor]]]:
        """Every block with its inputs (as `read` gives them), the next `read_ahead` blocks'
        reads in flight meanwhile, each input on a thread of its own: the storage has work while
        the block before is computed, and many reads at once (a disk or an object store serves
        one stream at a fraction of its rate). A block's list of inputs is emptied when the next
        block is asked for: keep what you need of it by other names."""
        if self.read_ahead <= 0 or len(blocks) <= 1:
            for block in blocks:
                yield block, self.read(unit, block)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max(1, len(unit.inputs)) * (self.read_ahead + 1),
                                            thread_name_prefix="dist-svc-read")
        ahead: collections.deque = collections.deque()
        todo = iter(blocks)

        def submit() -> None:
            block = next(todo, None)
            if block is not None:
                ahead.append((block, [self._pool.submit(self._fetch, unit, i, block)
                                      for i in range(len(unit.inputs))]))

        try:
            for _ in range(self.read_ahead + 1):
                submit()
            while ahead:
                block, futures = ahead.popleft()
                start = time.perf_counter()
                tensors = self._assemble(unit, [f.result() for f in futures])
                self.seconds += time.perf_counter() - start
                yield block, tensors  # computed while the next `read_ahead` blocks are read
                # The caller is done with this block: its inputs are freed before the next read
                # allocates, so that exactly `read_ahead` blocks are held beside the one computed.
                tensors.clear()
                submit()
        finally:
            for _, futures in ahead:  # stopped early (an error, a fallback): no read outlives us
                for f in futures:
                    f.cancel()
                wait(futures)

    def blocks(self, unit: "Unit", transposed: bool = False) -> list[Block]:
        """Blocks of about `block_elements`, aligned to the inputs' stored chunks (zarr), so that
        each chunk is read once."""
        shape = unit.shape
        if not shape:
            return [Block(0, 1, False)]
        length = shape[1] if transposed else shape[0]
        if not math.prod(shape):  # no bytes at all, whatever its extents: one empty block
            return [Block(0, length, transposed)]
        step = block_length(unit, transposed, self.block_elements)
        return [Block(i, min(i + step, length), transposed) for i in range(0, length, step)]

    def stored(self, unit: "Unit") -> Iterator[tuple[Block, torch.Tensor]]:
        """Every block of a copied unit's only input as stored, on the CPU: a non-float tensor
        is copied byte for byte (no compute dtype, no device, nothing to check for NaN)."""
        s = unit.inputs[0]
        checkpoint = self.checkpoints[s.checkpoint]
        for block in self.blocks(unit):
            start = time.perf_counter()
            raw = checkpoint.read(s.tensor, rows=slice(block.start, block.stop)) if unit.shape else \
                checkpoint.read(s.tensor)
            self.seconds += time.perf_counter() - start
            yield block, raw

    @staticmethod
    def whole(shape: tuple[int, ...]) -> Block:
        return Block(0, shape[0] if shape else 1, False)

    def read(self, unit: "Unit", block: Block | None) -> list[torch.Tensor]:
        """Every input's block (`None`: the whole tensor, whatever its length in each input), in
        compute dtype on the device, oriented (transposed for a column block); each in memory of
        its own (readers never hand out file mappings), so callers may change them in place. An
        adapter of the base input is the base block plus its change (the base is not read twice)."""
        start = time.perf_counter()
        inputs = self._assemble(unit, [self._fetch(unit, i, block) for i in range(len(unit.inputs))])
        self.seconds += time.perf_counter() - start
        return inputs

    def _fetch(self, unit: "Unit", i: int, block: Block | None) -> tuple[bool, torch.Tensor]:
        """Input i's block: (True, its change in float64) for an adapter of the unit's base, else
        (False, its weights)."""
        s = unit.inputs[i]
        checkpoint = self.checkpoints[s.checkpoint]
        base = unit.inputs[unit.base] if unit.base is not None else None
        if (base is not None and i != unit.base and isinstance(checkpoint, Adapter)
                and checkpoint.inner is self.checkpoints[base.checkpoint] and s.tensor == base.tensor):
            delta = self._delta(checkpoint, s.tensor, block)
            if delta is not None:
                return True, delta
        return False, self._read(checkpoint, s.tensor, block)

    def _assemble(self, unit: "Unit", fetched: list[tuple[bool, torch.Tensor]]) -> list[torch.Tensor]:
        """The adapters' blocks: base + change in float64, rounded once to the adapter's stored
        dtype (the base block holds the stored values exactly: compute dtypes are at least as wide)."""
        tensors = [t for _, t in fetched]
        for i, (is_delta, delta) in enumerate(fetched):
            if is_delta:
                stored = DTYPES[self.checkpoints[unit.inputs[i].checkpoint].tensors[unit.inputs[i].tensor].dtype][0]
                tensors[i] = delta.add_(tensors[unit.base]).to(stored).to(self.compute_dtype)
        return tensors

    def _delta(self, adapter: Adapter, name: str, block: Block | None) -> torch.Tensor | None:
        shape = adapter.inner.tensors[name].shape
        span = None if block is None or not shape else slice(block.start, block.stop)
        transposed = block is not None and block.transposed and bool(shape)
        delta = adapter.delta(name, None if transposed else span, span if transposed else None, torch.float64)
        if delta is None:
            return None
        return self._finite(self._to_device(delta.T if transposed else delta, torch.float64), name,
                            f"the adapter {adapter.source}")

    def _read(self, checkpoint: Checkpoint, name: str, block: Block | None) -> torch.Tensor:
        info = checkpoint.tensors[name]
        if not info.shape or block is None:
            raw = checkpoint.read(name)
        elif block.transposed:
            raw = checkpoint.read(name, cols=slice(block.start, block.stop)).T
        else:
            raw = checkpoint.read(name, rows=slice(block.start, block.stop))
        return self._finite(self._to_device(raw), name, info.where)

    def _to_device(self, raw: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """In the compute dtype on the device. To a GPU in the stored dtype, then widened there
        (`.to(cuda, float32)` of a bf16 tensor widens on the CPU first and moves twice the
        bytes: 2 GB/s measured on an H100 host), from pinned memory on a CUDA stream of this
        reading thread's own, so that the copies of blocks read ahead overlap the kernels of the
        block being computed; the compute stream waits for the copy before it uses the tensor."""
        dtype = dtype or self.compute_dtype
        if self.device.type != "cuda":
            return raw.to(dtype)
        streams = self._streams.__dict__
        if "stream" not in streams:
            streams["stream"] = torch.cuda.Stream(self.device)
        stream = streams["stream"]
        consumer = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(stream):
            tensor = raw.pin_memory().to(self.device, non_blocking=True).to(dtype)
        consumer.wait_stream(stream)
        tensor.record_stream(consumer)  # its memory is not reused before the compute stream is done
        return tensor

    @staticmethod
    def _finite(tensor: torch.Tensor, name: str, where: str) -> torch.Tensor:
        # A NaN or Inf anywhere makes the sum non-finite; only then is each element checked
        # (a finite tensor whose sum overflows is not refused).
        if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
            raise DistSvcError(f"tensor '{name}' in {where} contains NaN or Inf values; "
                               f"merging it would spread them. Repair or replace that checkpoint.")
        return tensor

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for c in self.checkpoints:
            c.close()


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
