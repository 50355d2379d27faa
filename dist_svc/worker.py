"""The worker: one unit in, its bytes on storage and a little metadata out.

Every executor runs this same code (in-process for the local executor, inside an actor for the
Ray executor), so every executor produces the same bytes. A worker reads the blocks it needs
(dist_svc.blocks), computes the base method and the calibration, writes the result through the
output layout's writer, and returns the checksum. Tensors never travel back to the driver.

Three ways through a unit:
- not calibrated: one pass, block by block: task vectors -> base method -> base + delta -> write;
- calibrated: pass 1 accumulates the float64 Grams of every block (`GramCalibration`); then one
  eigh; pass 2 applies the projector to each block's merged delta and writes it. Pass 2 takes the
  blocks from pass 1 when they fit in `cache_bytes`, else reads them again. A spectrum the Gram
  cannot resolve to float64 accuracy is recomputed by full SVD (recorded as "svd-fallback");
- methods that are not element-wise read every task's whole tensor.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import torch

from dist_svc.blocks import BLOCK_ELEMENTS, Block, BlockReader, flat_indices
from dist_svc.calibration import (
    GramCalibration, calibrate_gram, calibrate_singular_values, calibration_summary, oriented,
)
from dist_svc.config import MergeConfig
from dist_svc.errors import DistSvcError
from dist_svc.methods import METHODS, ModelParams, Where
from dist_svc.plan import Unit, open_inputs
from dist_svc.storage.output import OutputLayout, UnitWriter
from dist_svc.storage.types import DTYPES, ST_TO_NAME, tensor_bytes

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
    layout: OutputLayout
    pins: dict[str, str] = field(default_factory=dict)  # Hub models: the commits the plan resolved


@dataclass(frozen=True)
class UnitResult:
    name: str
    sha256: str
    seconds: float
    calibration: dict | None


def setup_process(device: str | torch.device) -> None:
    """Process-wide settings every worker relies on; each executor calls this once per process
    before its workers start."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # never round the Grams' inputs
        _init_cuda_linalg(device)
    elif torch.get_num_threads() != CPU_INTRA_OP_THREADS:
        torch.set_num_threads(CPU_INTRA_OP_THREADS)  # see CPU_INTRA_OP_THREADS


class Worker:
    def __init__(self, job: Job, device: str | torch.device = "cpu", block_elements: int = BLOCK_ELEMENTS,
                 cache_bytes: int = CACHE_BYTES, sync: bool = True):
        """`sync=False` leaves making the bytes durable to the caller, which must call the
        layout's `make_durable` before it records a unit (the local executor's driver does,
        once per manifest save)."""
        self.job = job
        self.device = torch.device(device)
        config = job.config
        self.method = METHODS[config.merge_method]
        # Half-precision compute is promoted: bf16 task vectors lose most of their bits.
        compute_dtype = torch.float64 if config.dtype == "float64" else torch.float32
        self.compute_dtype = compute_dtype
        self.reader = BlockReader(*open_inputs(config, job.pins), self.device, compute_dtype, block_elements)
        self.cache_bytes = cache_bytes
        self.sync = sync

    def run(self, unit: Unit) -> UnitResult:
        start = time.perf_counter()
        writer = self.job.layout.writer(unit.name, self.sync)
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

    def _plain(self, unit: Unit, writer: UnitWriter) -> None:
        for block in self.reader.blocks(unit.name, unit.shape):
            base, taus = self.reader.inputs(unit.name, block)
            merged = self._merge(unit, block, taus)
            writer.write(tensor_bytes(self._finish(base, merged, unit)))

    def _calibrated(self, unit: Unit, writer: UnitWriter) -> dict:
        cal = self.job.config.calibration
        k = self.job.config.k
        transposed, side = oriented(unit.shape, cal.side)
        n = unit.shape[0] if transposed else unit.shape[1]
        gram = GramCalibration(n, k, cal.resolved_alpha(k), side, cal.target, device=self.device)
        blocks = self.reader.blocks(unit.name, unit.shape, transposed)
        keep = 2 * math.prod(unit.shape) * torch.finfo(self.compute_dtype).bits // 8 <= self.cache_bytes
        cache: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for block in blocks:  # pass 1: Grams
            base, taus = self.reader.inputs(unit.name, block)
            merged = _finite(self._merge(unit, block, taus), unit, "the base method's result")
            gram.add(merged, taus)
            if keep:
                cache.append((base, merged))
            del taus
        for matrix in (gram.gram, *gram.cross, *(gram.task_grams or ())):
            _finite(matrix, unit, "the calibration's float64 Gram matrices")
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
                base, taus = self.reader.inputs(unit.name, block)
                merged = self._merge(unit, block, taus)
            result = self._finish(base, solution.apply(merged), unit)
            if transposed:
                out[:, block.start:block.stop] = result.T.cpu()
            else:
                writer.write(tensor_bytes(result))
        if transposed:
            writer.write(tensor_bytes(out))
        return calibration_summary(solution.singular_values, solution.eta, "gram", solution.overlaps)

    def _svd_fallback(self, unit: Unit, writer: UnitWriter) -> dict:
        cal = self.job.config.calibration
        whole = self.reader.whole(unit.shape)
        base, taus = self.reader.inputs(unit.name, whole)
        merged = self._merge(unit, whole, taus)
        result = calibrate_singular_values(merged, taus, cal.resolved_alpha(self.job.config.k), cal.side, cal.target)
        writer.write(tensor_bytes(self._finish(base, result.delta, unit)))
        return calibration_summary(result.singular_values, result.eta, "svd-fallback", result.overlaps)

    def _whole(self, unit: Unit, writer: UnitWriter) -> dict | None:
        """Methods that need whole tensors (every task at once)."""
        whole = self.reader.whole(unit.shape)
        base, taus = self.reader.inputs(unit.name, whole)
        merged = _finite(self._merge(unit, whole, taus), unit, "the base method's result")
        stats = None
        if unit.calibrate:
            for matrix in (merged, *taus):  # the Grams' entries are bounded by these squared norms
                _finite(torch.linalg.norm(matrix.double()).square(), unit, "the calibration's float64 Gram matrices")
            cal = self.job.config.calibration
            result = calibrate_gram(merged, taus, cal.resolved_alpha(self.job.config.k), cal.side, cal.target)
            merged, stats = result.delta, result.summary()
        writer.write(tensor_bytes(self._finish(base, merged, unit)))
        return stats

    def _merge(self, unit: Unit, block: Block, taus: list[torch.Tensor]) -> torch.Tensor:
        where = Where(unit.name, lambda: flat_indices(unit.shape, block, self.device))
        return self.method.merge(taus, [ModelParams(**m) for m in unit.models], unit.params, where)

    def _finish(self, base: torch.Tensor, delta: torch.Tensor, unit: Unit) -> torch.Tensor:
        """base + delta in the wider of the two dtypes, rounded once to the output dtype; never
        written if it is not finite (a merge that overflows is refused, not recorded)."""
        return _finite((base.to(delta.dtype) + delta).to(DTYPES[unit.out_dtype][0]), unit,
                       f"the merged tensor in {ST_TO_NAME[unit.out_dtype]}")

    def close(self) -> None:
        self.reader.close()


def _finite(tensor: torch.Tensor, unit: Unit, what: str) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        settings = ", ".join(f"{k}={v!r}" for k, v in unit.params.items() if isinstance(v, (int, float))
                             and not isinstance(v, bool))
        per_model = "; ".join(", ".join(f"{k}={v:g}" for k, v in m.items()) for m in unit.models)
        raise DistSvcError(f"tensor '{unit.name}': {what} is not finite (it overflows) with {settings or 'the defaults'} "
                           f"and per model [{per_model}]. Lower lambda or the weights; inputs and finished "
                           f"tensors are untouched.")
    return tensor


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
