"""The worker: one unit in, its bytes on storage and a little metadata out.

Every executor runs this same code (in-process for the local executor, inside an actor for the
Ray executor), so every executor produces the same bytes. A worker reads exactly the slices it
needs from the inputs, computes the task vectors, the base method and the calibration, writes the
result at its planned offset in the output shard, fsyncs, and returns the checksum. Tensors never
travel back to the driver.

A tensor is processed in blocks of rows (of columns, for a wide calibrated matrix, so that the
Grams are on the smaller side), never loaded whole:
- not calibrated: one pass, block by block: task vectors -> base method -> base + delta -> write;
- calibrated: pass 1 accumulates the float64 Grams of every block (`GramCalibration`); then one
  eigh; pass 2 applies the projector to each block's merged delta and writes it. Pass 2 takes the
  blocks from pass 1 when they fit in `cache_bytes`, else reads them again. A spectrum the Gram
  cannot resolve to float64 accuracy is recomputed by full SVD (recorded as "svd-fallback").
Methods that are not element-wise (they need the whole tensor of every task) read whole tensors.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
import torch

from dist_svc.calibration import (
    GramCalibration, calibrate_gram, calibrate_singular_values, calibration_summary, oriented,
)
from dist_svc.config import MergeConfig, layer_index, layer_position
from dist_svc.errors import DistSvcError
from dist_svc.methods import METHODS, ModelParams, Where
from dist_svc.plan import Unit, open_inputs
from dist_svc.storage.hf_output import TensorWriter
from dist_svc.storage import tensor_bytes
from dist_svc.storage.hf_output import range_sha256
from dist_svc.storage.safetensors_reader import DTYPES, SafetensorsCheckpoint
from dist_svc.storage.zarr_store import ZarrTensorWriter, array_sha256

BLOCK_ELEMENTS = 1 << 23  # ~8M elements (32 MiB in float32) per input block
# On a CPU, a matrix product's rounding depends on how many threads share it. Every worker
# computes with one intra-op thread, so the local executor (threads in one process) and the
# cluster executor (one process per actor) produce the same bytes; parallelism comes from
# running several units at once instead.
CPU_INTRA_OP_THREADS = 1
CACHE_BYTES = 2 << 30  # pass-1 blocks kept for pass 2 up to this size, else re-read


@dataclass(frozen=True)
class Job:
    """What every worker of one merge needs to know (small and picklable)."""

    config: MergeConfig
    out_dir: Path
    shard_paths: tuple[Path, ...]  # the .partial file of each output shard (safetensors output)

    @property
    def zarr(self) -> bool:
        return self.config.output.format == "zarr"

    def writer(self, unit: Unit, sync: bool):
        """Where a unit's bytes go: its place in a shard, or its own zarr array."""
        if self.zarr:
            return ZarrTensorWriter(self.out_dir, unit.name, unit.shape, unit.out_dtype, sync=True)
        return TensorWriter(self.shard_paths[unit.place.shard], unit.place.offset, unit.nbytes, sync)

    def stored_sha256(self, unit: Unit) -> str | None:
        """sha256 of a unit's bytes as they are on storage now."""
        if self.zarr:
            return array_sha256(self.out_dir, unit.name)
        return range_sha256(self.shard_paths[unit.place.shard], unit.place.offset, unit.nbytes)


@dataclass(frozen=True)
class UnitResult:
    name: str
    sha256: str
    seconds: float
    calibration: dict | None


@dataclass(frozen=True)
class _Block:
    """A range of rows of the tensor (or of columns, when `transposed`)."""

    start: int
    stop: int
    transposed: bool


class Worker:
    def __init__(self, job: Job, device: str | torch.device = "cpu", block_elements: int = BLOCK_ELEMENTS,
                 cache_bytes: int = CACHE_BYTES, sync: bool = True):
        """`sync=False` leaves fdatasync to the caller, which must sync a shard file before it
        records any unit written to it (the local executor's driver does, once per batch)."""
        self.job = job
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # never round the Grams' inputs
            _init_cuda_linalg(self.device)
        elif torch.get_num_threads() != CPU_INTRA_OP_THREADS:
            torch.set_num_threads(CPU_INTRA_OP_THREADS)  # process-wide: see CPU_INTRA_OP_THREADS
        config = job.config
        self.base, self.models = open_inputs(config)
        self.method = METHODS[config.merge_method]
        layers = [i for i in map(layer_index, self.base.tensors) if i is not None]
        self.num_layers = max(layers) + 1 if layers else 0
        self._params: dict[str, tuple[dict, list[ModelParams]]] = {}
        # Half-precision compute is promoted: bf16 task vectors lose most of their bits.
        self.compute_dtype = torch.float64 if config.dtype == "float64" else torch.float32
        self.block_elements = block_elements
        self.cache_bytes = cache_bytes
        self.sync = sync

    def run(self, unit: Unit) -> UnitResult:
        start = time.perf_counter()
        writer = self.job.writer(unit, self.sync)
        try:
            if not self.method.elementwise:
                stats = self._whole(unit, writer)
            elif unit.calibrate:
                stats = self._calibrated(unit, writer)
            else:
                stats = self._plain(unit, writer)
        except BaseException:
            writer.abort()
            raise
        digest = writer.close()
        return UnitResult(unit.name, digest, time.perf_counter() - start, stats)

    # -- the three ways through a unit ---------------------------------------------------------

    def _plain(self, unit: Unit, writer: TensorWriter) -> None:
        for block in self._blocks(unit, transposed=False):
            base, taus = self._inputs(unit.name, block)
            merged = self._merge(unit, block, taus)
            writer.write(tensor_bytes(self._finish(base, merged, unit)))

    def _calibrated(self, unit: Unit, writer: TensorWriter) -> dict:
        cal = self.job.config.calibration
        k = self.job.config.k
        transposed, side = oriented(unit.shape, cal.side)
        n = unit.shape[0] if transposed else unit.shape[1]
        gram = GramCalibration(n, k, cal.resolved_alpha(k), side, cal.target, device=self.device)
        blocks = self._blocks(unit, transposed)
        keep = 2 * math.prod(unit.shape) * torch.finfo(self.compute_dtype).bits // 8 <= self.cache_bytes
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        for block in blocks:  # pass 1: Grams
            base, taus = self._inputs(unit.name, block)
            merged = self._merge(unit, block, taus)
            gram.add(merged, taus)
            if keep:
                cache.append((base, merged))
            del taus
        solution = gram.solve()
        if not solution.trusted:
            cache.clear()
            return self._svd_fallback(unit, writer)

        out = torch.empty(unit.shape, dtype=DTYPES[unit.out_dtype][0]) if transposed else None
        for j, block in enumerate(blocks):  # pass 2: Wm' = Wm P, block by block
            if keep:
                base, merged = cache[j]
                cache[j] = None  # free as we go
            else:
                base, taus = self._inputs(unit.name, block)
                merged = self._merge(unit, block, taus)
            result = self._finish(base, solution.apply(merged), unit)
            if transposed:
                out[:, block.start:block.stop] = result.T.cpu()
            else:
                writer.write(tensor_bytes(result))
        if transposed:
            writer.write(tensor_bytes(out))
        return calibration_summary(solution.singular_values, solution.eta, "gram", solution.overlaps)

    def _svd_fallback(self, unit: Unit, writer: TensorWriter) -> dict:
        cal = self.job.config.calibration
        whole = _Block(0, unit.shape[0], False)
        base, taus = self._inputs(unit.name, whole)
        merged = self._merge(unit, whole, taus)
        result = calibrate_singular_values(merged, taus, cal.resolved_alpha(self.job.config.k), cal.side, cal.target)
        writer.write(tensor_bytes(self._finish(base, result.delta, unit)))
        return calibration_summary(result.singular_values, result.eta, "svd-fallback", result.overlaps)

    def _whole(self, unit: Unit, writer: TensorWriter) -> dict | None:
        """Methods that need whole tensors (every task at once)."""
        whole = _Block(0, unit.shape[0] if unit.shape else 1, False)
        base, taus = self._inputs(unit.name, whole)
        merged = self._merge(unit, whole, taus)
        stats = None
        if unit.calibrate:
            cal = self.job.config.calibration
            result = calibrate_gram(merged, taus, cal.resolved_alpha(self.job.config.k), cal.side, cal.target)
            merged, stats = result.delta, result.summary()
        writer.write(tensor_bytes(self._finish(base, merged, unit)))
        return stats

    def _merge(self, unit: Unit, block: _Block, taus: list[torch.Tensor]) -> torch.Tensor:
        where = Where(unit.name, lambda: _flat_indices(unit.shape, block, self.device))
        params, models = self._params_for(unit.name)
        return self.method.merge(taus, models, params, where)

    def _params_for(self, name: str) -> tuple[dict, list[ModelParams]]:
        """The parameters of one tensor (gradients over the layers and filters resolved)."""
        if name not in self._params:
            t = layer_position(name, self.num_layers)
            params, models = self.job.config.resolved(name, t)
            self._params[name] = (params, [ModelParams(w, d) for w, d in models])
        return self._params[name]

    # -- reading -------------------------------------------------------------------------------

    def _blocks(self, unit: Unit, transposed: bool) -> list[_Block]:
        if not unit.shape:
            return [_Block(0, 1, False)]
        length = unit.shape[1] if transposed else unit.shape[0]
        per_index = math.prod(unit.shape) // max(length, 1)
        step = max(1, self.block_elements // max(per_index, 1))
        # Whole chunks of the inputs stored in chunks (zarr): each is then read once.
        extent = max(c.chunk_extent(unit.name, 1 if transposed else 0) for c in (self.base, *self.models))
        step = max(extent, step // extent * extent)
        return [_Block(i, min(i + step, length), transposed) for i in range(0, length, step)] or [_Block(0, 0, transposed)]

    def _inputs(self, name: str, block: _Block) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The base block and the task vectors `ft_i - base` of one block, in compute dtype,
        oriented (transposed for a column block)."""
        base = self._read(self.base, name, block)
        # In place: every read is a buffer of its own (the reader never hands out file mappings).
        return base, [self._read(model, name, block).sub_(base) for model in self.models]

    def _read(self, checkpoint: SafetensorsCheckpoint, name: str, block: _Block) -> torch.Tensor:
        info = checkpoint.tensors[name]
        if not info.shape:
            raw = checkpoint.read(name)
        elif block.transposed:
            raw = checkpoint.read(name, cols=slice(block.start, block.stop)).T
        else:
            raw = checkpoint.read(name, rows=slice(block.start, block.stop))
        # To the device in the stored dtype, then widened there: `.to(cuda, float32)` of a bf16
        # tensor widens on the CPU first and moves twice the bytes (2 GB/s measured on an H100
        # host), which made it the limit of a GPU merge.
        tensor = raw.to(self.device).to(self.compute_dtype) if self.device.type == "cuda" \
            else raw.to(self.compute_dtype)
        # A NaN or Inf anywhere makes the sum non-finite; only then is each element checked
        # (a finite tensor whose sum overflows is not refused).
        if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
            raise DistSvcError(f"tensor '{name}' in {info.file} contains NaN or Inf values; "
                               f"merging it would spread them. Repair or replace that checkpoint.")
        return tensor

    def _finish(self, base: torch.Tensor, delta: torch.Tensor, unit: Unit) -> torch.Tensor:
        """base + delta in the wider of the two dtypes, rounded once to the output dtype."""
        return (base.to(delta.dtype) + delta).to(DTYPES[unit.out_dtype][0])

    def close(self) -> None:
        self.base.close()
        for m in self.models:
            m.close()


_LINALG_READY: set[torch.device] = set()
_LINALG_LOCK = threading.Lock()


def _init_cuda_linalg(device: torch.device) -> None:
    """Initialise torch's CUDA solvers once per process, before any worker thread needs them:
    their lazy initialisation fails when two threads reach it at once ("lazy wrapper should be
    called at most once")."""
    with _LINALG_LOCK:
        if device in _LINALG_READY:
            return
        a = torch.eye(2, dtype=torch.float64, device=device)
        torch.linalg.eigh(a)
        torch.linalg.svd(a)
        torch.linalg.qr(a)
        _LINALG_READY.add(device)


def _flat_indices(shape: tuple[int, ...], block: _Block, device: torch.device) -> torch.Tensor:
    """The index of each element of a block in the flattened whole tensor, in the block's own
    (oriented) layout."""
    if not shape:
        return torch.zeros((), dtype=torch.int64, device=device)
    if block.transposed:  # columns start..stop of an m x n matrix, as (stop - start) x m
        m, n = shape
        cols = torch.arange(block.start, block.stop, dtype=torch.int64, device=device)
        return cols[:, None] + torch.arange(m, dtype=torch.int64, device=device)[None, :] * n
    per_row = math.prod(shape[1:])
    flat = torch.arange(block.start * per_row, block.stop * per_row, dtype=torch.int64, device=device)
    return flat.view(block.stop - block.start, *shape[1:])
