"""The worker: one unit in, its bytes on storage and a little metadata out.

Every executor runs this same code (in-process for the local executor, inside an actor for the
Ray executor), so every executor produces the same bytes. A worker reads the blocks it needs
(dist_svc.blocks), computes the method and the calibration, writes the result through the
output layout's writer, and returns the checksum. Tensors never travel back to the driver.

A method works on task vectors (`x_i - base`, giving the merged delta; output `base + delta`) or
on the inputs' weights (giving the merged weights; the delta `merged - base` where calibrated).
Three ways through a unit:
- not calibrated: one pass, block by block: inputs -> method -> output -> write;
- calibrated: pass 1 accumulates the float64 Grams of every block's merged delta and task
  vectors (`GramCalibration`); then one eigh; pass 2 applies the projector to each block's
  merged delta and writes `base + delta'`. Pass 2 takes the blocks from pass 1 when they fit in
  `cache_bytes`, else reads them again. A spectrum the Gram cannot resolve to float64 accuracy
  is recomputed by full SVD (recorded as "svd-fallback");
- whole tensors, for methods that need them (and for row-local ones where rows cannot be read:
  a 1-D tensor, or a wide matrix calibrated through its columns), and for vocabulary tensors,
  which are aligned token by token first (dist_svc.vocab).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import torch

from dist_svc.blocks import BLOCK_ELEMENTS, Block, BlockReader, Inputs, flat_indices
from dist_svc.calibration import (
    GramCalibration, calibrate_gram, calibrate_singular_values, calibration_summary, oriented,
)
from dist_svc.config import MergeConfig
from dist_svc.errors import DistSvcError
from dist_svc.methods import Where
from dist_svc.plan import Unit, open_inputs, side_file_reader
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
        self.method = config.method
        # Half-precision compute is promoted: bf16 task vectors lose most of their bits.
        compute_dtype = torch.float64 if config.dtype == "float64" else torch.float32
        self.compute_dtype = compute_dtype
        first, rest = open_inputs(config, pins=job.pins)
        self.reader = BlockReader([first, *rest], self.device, compute_dtype, block_elements)
        self.cache_bytes = cache_bytes
        self.sync = sync
        self._vocabulary = None

    def run(self, unit: Unit) -> UnitResult:
        start = time.perf_counter()
        writer = self.job.layout.writer(unit.name, self.sync)
        try:
            if self._whole_tensor(unit):
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

    def _whole_tensor(self, unit: Unit) -> bool:
        if unit.needs == "tensor":
            return True
        if unit.needs == "row":  # blocks of rows hold whole rows, column blocks do not
            return len(unit.shape) < 2 or (unit.calibrate and oriented(unit.shape, "column")[0])
        return False

    # -- the three ways through a unit ---------------------------------------------------------

    def _plain(self, unit: Unit, writer: UnitWriter) -> None:
        for block in self.reader.blocks(unit):
            writer.write(tensor_bytes(self._output(unit, block, self.reader.read(unit, block))))

    def _calibrated(self, unit: Unit, writer: UnitWriter) -> dict:
        cal = self.job.config.calibration
        transposed, side = oriented(unit.shape, cal.side)
        n = unit.shape[0] if transposed else unit.shape[1]
        gram = GramCalibration(n, len(unit.fine_tunes), unit.alpha, side, cal.target, device=self.device)
        blocks = self.reader.blocks(unit, transposed)
        keep = 2 * math.prod(unit.shape) * torch.finfo(self.compute_dtype).bits // 8 <= self.cache_bytes
        cache: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for block in blocks:  # pass 1: Grams
            base, merged, taus = self._delta(unit, block, self.reader.read(unit, block))
            _finite(merged, unit, "the base method's result")
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
                base, merged, _ = self._delta(unit, block, self.reader.read(unit, block))
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
        block = self.reader.whole(unit.shape)
        base, merged, taus = self._delta(unit, block, self._inputs_whole(unit))
        result = calibrate_singular_values(merged, taus, unit.alpha, cal.side, cal.target)
        writer.write(tensor_bytes(self._finish(base, result.delta, unit)))
        return calibration_summary(result.singular_values, result.eta, "svd-fallback", result.overlaps)

    def _whole(self, unit: Unit, writer: UnitWriter) -> dict | None:
        """Methods that need whole tensors (every input at once)."""
        block = self.reader.whole(unit.shape)
        tensors = self._inputs_whole(unit)
        if not unit.calibrate:
            writer.write(tensor_bytes(self._output(unit, block, tensors)))
            return None
        cal = self.job.config.calibration
        base, merged, taus = self._delta(unit, block, tensors)
        _finite(merged, unit, "the base method's result")
        for matrix in (merged, *taus):  # the Grams' entries are bounded by these squared norms
            _finite(torch.linalg.norm(matrix.double()).square(), unit, "the calibration's float64 Gram matrices")
        result = calibrate_gram(merged, taus, unit.alpha, cal.side, cal.target)
        writer.write(tensor_bytes(self._finish(base, result.delta, unit)))
        return result.summary()

    # -- the method on one block -----------------------------------------------------------------

    def _inputs_whole(self, unit: Unit) -> list[torch.Tensor]:
        tensors = self.reader.read(unit, None)
        if unit.vocabulary:
            from dist_svc.vocab import align

            tensors = align(self.vocabulary, tensors, [s.checkpoint for s in unit.inputs])
        return tensors

    def _merge(self, unit: Unit, block: Block, tensors: list[torch.Tensor]) -> torch.Tensor:
        where = Where(unit.name, lambda: flat_indices(unit.shape, block, self.device), unit.base)
        return self.method.merge(tensors, unit.call_params(self.method), where)

    def _output(self, unit: Unit, block: Block, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The merged block, uncalibrated, in the output dtype."""
        if self.method.operates_on == "weights":
            return _finite(self._merge(unit, block, tensors).to(DTYPES[unit.out_dtype][0]), unit,
                           f"the merged tensor in {ST_TO_NAME[unit.out_dtype]}")
        base, delta, _ = self._delta(unit, block, tensors)
        return self._finish(base, delta, unit)

    def _delta(self, unit: Unit, block: Block, tensors: list[torch.Tensor]
               ) -> tuple[torch.Tensor | None, torch.Tensor, list[torch.Tensor]]:
        """(base, merged delta, task vectors) of one block; base None (zero) for a tensor
        without a base, whose "task vectors" are then the weights."""
        base = None if unit.base is None else tensors[unit.base]
        exact = tensors.deltas if isinstance(tensors, Inputs) else {}  # adapters of the base: their change
        if self.method.operates_on == "weights":
            merged = self._merge(unit, block, tensors)
            return base, merged - base, [exact[i] if i in exact else tensors[i] - base for i in unit.fine_tunes]
        # In place: every read is a buffer of its own, and methods never change their inputs.
        taus = [exact[i] if i in exact else tensors[i] if base is None else tensors[i].sub_(base)
                for i in unit.fine_tunes]
        return base, self._merge(unit, block, taus), taus

    def _finish(self, base: torch.Tensor | None, delta: torch.Tensor, unit: Unit) -> torch.Tensor:
        """base + delta in the wider of the two dtypes, rounded once to the output dtype; never
        written if it is not finite (a merge that overflows is refused, not recorded)."""
        out = delta if base is None else base.to(delta.dtype) + delta
        return _finite(out.to(DTYPES[unit.out_dtype][0]), unit, f"the merged tensor in {ST_TO_NAME[unit.out_dtype]}")

    @property
    def vocabulary(self):
        """The merge's output vocabulary (dist_svc.vocab), built once per worker from the
        checkpoints' tokenizer files, exactly as the planner built it."""
        if self._vocabulary is None:
            from dist_svc.vocab import build_vocabulary

            self._vocabulary = build_vocabulary(self.job.config, side_file_reader(self.reader.checkpoints))
        return self._vocabulary

    def close(self) -> None:
        self.reader.close()


def _finite(tensor: torch.Tensor, unit: Unit, what: str) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        settings = ", ".join(f"{k}={v!r}" for k, v in unit.params.items() if isinstance(v, (int, float))
                             and not isinstance(v, bool))
        per_model = "; ".join(", ".join(f"{k}={v!r}" for k, v in m.items()) for m in unit.models)
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
