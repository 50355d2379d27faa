"""The worker: one unit in, its bytes on storage and a little metadata out.

Every executor runs this same code (in-process for the local executor, inside an actor for the
Ray executor), so every executor produces the same bytes. A worker reads the blocks it needs
(dist_svc.blocks), computes the method and the calibration, writes the result through the
output layout's writer, and returns the checksum. Tensors never travel back to the driver.

A method works on task vectors (`x_i - base`, giving the merged delta; output `base + delta`) or
on the inputs' weights (giving the merged weights; the delta `merged - base` where calibrated).
Three ways through a unit, besides a non-float tensor's copy (its input's bytes, block by block):
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
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from dist_svc.blocks import BLOCK_ELEMENTS, Block, BlockReader, flat_indices
from dist_svc.memory import (
    CACHE_BYTES, MMAP_THRESHOLD, WRITE_BEHIND, Ticket, fallback_footprint, keeps_inputs, streamed, whole_tensor,
)
from dist_svc.calibration import (
    GramCalibration, calibrate_gram, calibrate_singular_values, calibration_summary, oriented,
)
from dist_svc.config import MergeConfig
from dist_svc.errors import DistSvcError
from dist_svc.methods import Where
from dist_svc.methods.base import Extent, Output, drive
from dist_svc.plan import Unit, open_inputs, side_file_reader
from dist_svc.storage.output import OutputLayout, UnitWriter
from dist_svc.storage.types import DTYPES, ST_TO_NAME, tensor_bytes

# On a CPU, a matrix product's rounding depends on how many threads share it. Every worker
# computes with one intra-op thread, so the local executor (threads in one process) and the
# cluster executor (one process per actor) produce the same bytes; parallelism comes from
# running several units at once instead.
CPU_INTRA_OP_THREADS = 1


@dataclass(frozen=True)
class Job:
    """What every worker of one merge needs to know (small and picklable)."""

    config: MergeConfig
    layout: OutputLayout
    pins: dict[str, str] = field(default_factory=dict)  # Hub models: the commits the plan resolved


@dataclass(frozen=True)
class UnitResult:
    name: str
    checksum: str  # of the bytes written (dist_svc.storage.checksum)
    seconds: float
    calibration: dict | None
    stages: dict[str, float]  # seconds in "read", "compute", "checksum", "write"


def setup_process(device: str | torch.device) -> None:
    """Process-wide settings every worker relies on; each executor calls this once per process
    before its workers start."""
    device = torch.device(device)
    _allocator_settings()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # never round the Grams' inputs
        _init_cuda_linalg(device)
    elif torch.get_num_threads() != CPU_INTRA_OP_THREADS:
        torch.set_num_threads(CPU_INTRA_OP_THREADS)  # see CPU_INTRA_OP_THREADS


def _allocator_settings() -> None:
    """glibc keeps freed memory in its arenas for reuse. With blocks freed by the reading, computing
    and writing threads in an order no allocator can predict, and blocks of every size (a row of
    2048 or of 5632 elements, a tensor's last block), the arenas fragment: the wide 310M-parameter
    merge of docs/benchmarks.md peaked at 1.2-1.5 GiB with blocks served from the heap, against
    ~0.45 GiB of live buffers. Every allocation of 1 MiB or more (every block) is therefore mapped
    on its own and returned to the system when freed: the resident memory is what is live, which
    is what the footprints (dist_svc.memory) count. It costs a page fault per 4 KiB of a fresh
    block, ~10% more CPU time on that merge. Smaller allocations stay on the heap, kept for reuse
    up to 32 MiB; threads share two arenas."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 32 << 20)  # M_TRIM_THRESHOLD
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError, TypeError):
        pass  # not glibc: its own allocator decides


class Worker:
    def __init__(self, job: Job, device: str | torch.device = "cpu", block_elements: int = BLOCK_ELEMENTS,
                 cache_bytes: int = CACHE_BYTES, sync: bool = True, checkpoints: list | None = None,
                 progress: Callable[[str, int], None] | None = None):
        """`sync=False` leaves making the bytes durable to the caller, which must call the
        layout's `make_durable` before it records a unit (the local executor's driver does,
        once per manifest save). `checkpoints`: the merge's inputs, opened once and shared by
        the workers of a process (their headers parsed once); else this worker opens them.
        `progress(name, nbytes)`: called as blocks of a unit are done, with their share of the
        unit's output bytes (a calibrated block counts half in each pass)."""
        self.job = job
        self.device = torch.device(device)
        config = job.config
        self.method = config.method
        # Half-precision compute is promoted: bf16 task vectors lose most of their bits.
        compute_dtype = torch.float64 if config.dtype == "float64" else torch.float32
        self.compute_dtype = compute_dtype
        self._owns_inputs = checkpoints is None
        if checkpoints is None:
            first, rest = open_inputs(config, pins=job.pins)
            checkpoints = [first, *rest]
        self.reader = BlockReader(checkpoints, self.device, compute_dtype, block_elements)
        self.cache_bytes = cache_bytes
        self.sync = sync
        self._vocabulary = None
        self._ticket: Ticket | None = None
        self._progress = progress
        self._writes = _WriteThread()
        # A streamed method's output pass (`Method.passes`) and this traversal's function of it.
        self._output_pass: Output | None = None
        self._blockwise: Callable | None = None

    def run(self, unit: Unit, ticket: Ticket | None = None) -> UnitResult:
        """Merge one unit. `ticket`: its admission to a memory budget, which a full-SVD fallback
        exchanges for that path's larger footprint (dist_svc.memory)."""
        start = time.perf_counter()
        read_before = self.reader.seconds
        self._ticket = ticket
        self._output_pass = self._blockwise = None
        writer = _WriteBehind(self.job.layout.writer(unit.name, self.sync), self._writes)
        try:
            if unit.copied:
                stats = self._copied(unit, writer)
            elif whole_tensor(unit, self.method):
                stats = self._whole(unit, writer)
            elif unit.calibrate:
                stats = self._calibrated(unit, writer)
            else:
                stats = self._plain(unit, writer)
        except BaseException as e:
            writer.abort()
            if isinstance(e, Exception) and not isinstance(e, (DistSvcError, OSError)):
                # A bug (of a method, or of dist-svc with an input it does not expect): one
                # paragraph naming the tensor, not a traceback; storage errors keep their own words.
                raise DistSvcError(
                    f"tensor '{unit.name}': merging it with {self.job.config.merge_method} failed "
                    f"({type(e).__name__}: {str(e)[:300]}). Nothing of it was recorded; the tensors finished "
                    f"so far are kept. This is a bug: please report it with this message (`dist-svc status` "
                    f"shows how far the merge came).") from e
            raise
        digest = writer.close()
        seconds = time.perf_counter() - start
        stages = {"read": self.reader.seconds - read_before, **writer.seconds}
        stages["compute"] = max(0.0, seconds - sum(stages.values()))
        return UnitResult(unit.name, digest, seconds, stats, stages)

    # -- the ways through a unit ---------------------------------------------------------------

    def _copied(self, unit: Unit, writer: UnitWriter) -> None:
        for block, raw in self.reader.stored(unit):
            writer.write(tensor_bytes(raw))
            self._advance(unit, block, 1)

    def _plain(self, unit: Unit, writer: UnitWriter) -> None:
        blocks = self.reader.blocks(unit)
        for block, tensors in self._passes(unit, blocks):
            writer.write(tensor_bytes(self._output(unit, block, tensors)))
            self._advance(unit, block, 1)

    def _passes(self, unit: Unit, blocks: list[Block]) -> Iterable[tuple[Block, list[torch.Tensor]]]:
        """The unit's blocks for the pass that merges them. A method with a streaming form
        (`memory.streamed`) first runs its reductions, each a pass over the blocks; the inputs'
        blocks are kept from the first pass to the last while they fit (`memory.keeps_inputs`),
        else each pass reads them again."""
        if not streamed(unit, self.method):
            return self.reader.stream(unit, blocks)
        kept = [] if keeps_inputs(unit, self.job.config, self.cache_bytes) else None
        read = False

        def each_block():
            nonlocal read
            if read and kept is not None:
                yield from kept
                return
            for block, tensors in self.reader.stream(unit, blocks):
                if kept is not None:  # its own list: the stream empties the one it yields
                    kept.append((block, list(tensors)))
                yield block, tensors
            read = True

        extent = Extent(unit.name, unit.shape, unit.base, not (blocks and blocks[0].transposed), self.compute_dtype)
        self._output_pass = drive(self.method.passes, unit.call_params(self.method), extent,
                                  lambda: ((self._views(unit, t), self._where(unit, b)) for b, t in each_block()))
        self._restart()
        if not (read and kept):
            return self.reader.stream(unit, blocks)

        def consumed():  # the last pass frees each block as it goes
            for j, item in enumerate(kept):
                kept[j] = None
                yield item

        return consumed()

    def _restart(self) -> None:
        """A new pass of a streamed method's output over the blocks, in order."""
        if self._output_pass is not None:
            self._blockwise = self._output_pass()

    def _calibrated(self, unit: Unit, writer: UnitWriter) -> dict:
        cal = self.job.config.calibration
        transposed, side = oriented(unit.shape, cal.side)
        n = unit.shape[0] if transposed else unit.shape[1]
        gram = GramCalibration(n, len(unit.fine_tunes), unit.alpha, side, cal.target, device=self.device)
        blocks = self.reader.blocks(unit, transposed)
        keep = 2 * math.prod(unit.shape) * torch.finfo(self.compute_dtype).bits // 8 <= self.cache_bytes
        cache: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for block, tensors in self._passes(unit, blocks):  # pass 1: Grams
            base, merged, taus = self._delta(unit, block, tensors)
            _finite(merged, unit, "the base method's result")
            gram.add(merged, taus)
            if keep:
                cache.append((base, merged))
            del taus
            self._advance(unit, block, 0.5)
        for matrix in (gram.gram, *gram.cross, *(gram.task_grams or ())):
            _finite(matrix, unit, "the calibration's float64 Gram matrices")
        if gram.needs_projections:  # the row side without task Grams: the task vectors once more
            self._restart()
            for block, tensors in self.reader.stream(unit, blocks):
                gram.add_projections(self._delta(unit, block, tensors)[2])
        solution = gram.solve()
        if not solution.trusted:
            cache.clear()
            del gram, solution
            if self._ticket is not None:
                wanted = fallback_footprint(unit, self.job.config, self.device.type == "cuda")
                if not wanted.fits(self._ticket.limit):
                    raise DistSvcError(f"tensor '{unit.name}' needs its exact SVD ({_gib(wanted)} GiB; the Gram path "
                                       f"cannot resolve its spectrum), more than the memory limit of "
                                       f"{_gib(self._ticket.limit)} GiB. Raise --memory-limit, or merge it on a "
                                       f"machine with more memory; the tensors finished so far are kept.")
                self._ticket.exchange(wanted)
            return self._svd_fallback(unit, writer)

        # A wide matrix is produced by columns: written in place where the writer can, else
        # assembled here.
        out = torch.empty(unit.shape, dtype=DTYPES[unit.out_dtype][0]) if transposed and not writer.columns else None
        self._restart()
        again = ((block, None) for block in blocks) if keep else self.reader.stream(unit, blocks)
        for j, (block, tensors) in enumerate(again):  # pass 2: Wm' = Wm P, block by block
            if keep:
                base, merged = cache[j]
                cache[j] = None  # free as we go
            else:
                base, merged, _ = self._delta(unit, block, tensors)
            result = self._finish(base, solution.apply(merged), unit)
            if out is not None:
                out[:, block.start:block.stop] = result.T.cpu()
            elif transposed:
                writer.write_columns(block.start, block.stop, tensor_bytes(result.T))
            else:
                writer.write(tensor_bytes(result))
            self._advance(unit, block, 0.5)
        if out is not None:
            writer.write(tensor_bytes(out))
        return calibration_summary(solution.singular_values, solution.eta, "gram", solution.overlaps)

    def _svd_fallback(self, unit: Unit, writer: UnitWriter) -> dict:
        cal = self.job.config.calibration
        block = self.reader.whole(unit.shape)
        self._output_pass = self._blockwise = None  # the method on the whole tensors
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

    def _advance(self, unit: Unit, block: Block, share: float) -> None:
        if self._progress is not None and unit.shape:
            length = unit.shape[1] if block.transposed else unit.shape[0]
            self._progress(unit.name, int(share * unit.nbytes * (block.stop - block.start) / max(length, 1)))

    # -- the method on one block -----------------------------------------------------------------

    def _inputs_whole(self, unit: Unit) -> list[torch.Tensor]:
        tensors = self.reader.read(unit, None)
        if unit.vocabulary:
            from dist_svc.vocab import align

            tensors = align(self.vocabulary, tensors, [s.checkpoint for s in unit.inputs])
        return tensors

    def _where(self, unit: Unit, block: Block) -> Where:
        return Where(unit.name, lambda: flat_indices(unit.shape, block, self.device), unit.base)

    def _merge(self, unit: Unit, block: Block, tensors: list[torch.Tensor],
               base: torch.Tensor | None = None) -> torch.Tensor:
        if self._blockwise is not None:  # a streamed method's output pass
            return self._blockwise(tensors, self._where(unit, block))
        return self.method.merge(tensors, unit.call_params(self.method), self._where(unit, block), base)

    def _views(self, unit: Unit, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """What the method takes of a block's inputs: the weights, or the task vectors (new
        tensors: the inputs' blocks may be kept for the next pass)."""
        if self.method.operates_on == "weights":
            return tensors
        base = None if unit.base is None else tensors[unit.base]
        return [tensors[i] if base is None else tensors[i] - base for i in unit.fine_tunes]

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
        if self.method.operates_on == "weights":
            merged = self._merge(unit, block, tensors)
            return base, merged - base, [tensors[i] - base for i in unit.fine_tunes]
        # In place: every read is a buffer of its own, and methods never change their inputs.
        taus = [tensors[i] if base is None else tensors[i].sub_(base) for i in unit.fine_tunes]
        return base, self._merge(unit, block, taus, base), taus

    def _finish(self, base: torch.Tensor | None, delta: torch.Tensor, unit: Unit) -> torch.Tensor:
        """base + delta in the wider of the two dtypes, rounded once to the output dtype; never
        written if it is not finite (a merge that overflows is refused, not recorded)."""
        out = delta if base is None else delta.add_(base)  # in place: the delta is this block's own
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
        self._writes.stop()
        if self._owns_inputs:
            self.reader.close()


class _WriteThread:
    """A worker's writes and checksums, done on a thread of their own in order, while the worker
    computes the next block; at most WRITE_BEHIND blocks wait (counted in the footprint)."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue(maxsize=WRITE_BEHIND)
        self.thread: threading.Thread | None = None

    def put(self, job) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="dist-svc-write", daemon=True)
            self.thread.start()
        self.queue.put(job)

    def _loop(self) -> None:
        while (job := self.queue.get()) is not None:
            job()

    def stop(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.thread = None


class _WriteBehind:
    """A unit's writer fed through the worker's write thread: `close` waits for its writes and
    raises what they raised."""

    def __init__(self, writer: UnitWriter, writes: _WriteThread):
        self.writer, self.writes = writer, writes
        self.columns, self.seconds = writer.columns, writer.seconds
        self.error: BaseException | None = None

    def _submit(self, call) -> None:
        if self.error is not None:
            raise self.error

        def job() -> None:
            try:
                if self.error is None:
                    call()
            except BaseException as e:  # raised in the worker's thread, at its next write or close
                self.error = e

        self.writes.put(job)

    def write(self, data) -> None:
        self._submit(lambda: self.writer.write(data))

    def write_columns(self, start: int, stop: int, data) -> None:
        self._submit(lambda: self.writer.write_columns(start, stop, data))

    def _drain(self) -> None:
        finished = threading.Event()
        self.writes.put(finished.set)
        finished.wait()
        if self.error is not None:
            raise self.error

    def close(self) -> str:
        self._drain()
        return self.writer.close()

    def abort(self) -> None:
        try:
            self._drain()
        except BaseException:
            pass
        self.writer.abort()


def _gib(fp) -> str:
    return f"{max(fp.host, fp.device) / 2**30:.1f}"


def _finite(tensor: torch.Tensor, unit: Unit, what: str) -> torch.Tensor:
    # Finite extremes mean every element is finite (one reduction, no temporary: NaN propagates
    # into them); only otherwise is each element checked.
    if tensor.numel() and not (torch.isfinite(torch.stack(torch.aminmax(tensor))).all()
                               or torch.isfinite(tensor).all()):
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
