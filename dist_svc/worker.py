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
    GramCalibration, GramSolution, calibrate_singular_values, calibration_summary, oriented,
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
class Target:
    """One output of a run: its config and where its bytes go."""

    config: MergeConfig
    layout: OutputLayout


@dataclass(frozen=True)
class Job:
    """What every worker of one run needs to know (small and picklable): the merge's config and
    output, and for a batch (dist_svc.batch) the other merges of the same inputs, each a target
    of its own (`Unit.variants` names which a unit feeds)."""

    config: MergeConfig
    layout: OutputLayout
    pins: dict[str, str] = field(default_factory=dict)  # Hub models: the commits the plan resolved
    others: tuple[Target, ...] = ()

    @property
    def targets(self) -> tuple[Target, ...]:
        return (Target(self.config, self.layout), *self.others)


@dataclass(frozen=True)
class UnitResult:
    name: str
    checksum: str | None  # of the bytes written (dist_svc.storage.checksum); None with `error`
    seconds: float
    calibration: dict | None
    stages: dict[str, float]  # seconds in "read", "compute", "checksum", "write"
    target: int = 0  # which of the job's targets it was written for
    error: str | None = None  # why this target's result was refused (not finite): nothing of it was recorded


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


class _Member:
    """One target's share of a unit: its unit (its parameters), config and writer; the method's
    scale it multiplies the shared result by; what failed of it, and its calibration."""

    def __init__(self, index: int, unit: Unit, target: Target, writer: "_WriteBehind"):
        self.target, self.unit, self.config, self.writer = index, unit, target.config, writer
        self.method = target.config.method
        self.params = {} if unit.copied else unit.call_params(self.method)  # a copied tensor is not merged
        self.scale = 1.0
        if self.method.scale in self.params:
            self.scale = self.params[self.method.scale]
            self.params[self.method.scale] = 1.0
        self.error: str | None = None
        self.stats: dict | None = None
        self.gram: GramCalibration | None = None
        self.solution = None

    def fail(self, error: DistSvcError) -> None:
        self.error = str(error)
        self.writer.abort()

    def scaled(self, merged: torch.Tensor) -> torch.Tensor:
        return merged if self.scale == 1 else merged * self.scale


class _Compute:
    """The method computed once for the members whose settings differ at most in its scale
    (`Method.scale`); a streamed method's output pass and this traversal's function of it."""

    def __init__(self, member: _Member):
        self.method, self.params, self.members = member.method, member.params, [member]
        self.output_pass: Output | None = None
        self.blockwise: Callable | None = None

    def restart(self) -> None:
        """A new pass of a streamed method's output over the blocks, in order."""
        if self.output_pass is not None:
            self.blockwise = self.output_pass()

    @property
    def live(self) -> list[_Member]:
        return [m for m in self.members if m.error is None]


def _computes(members: list[_Member]) -> list[_Compute]:
    out: dict[tuple, _Compute] = {}
    for m in members:
        key = (m.method.name, repr(sorted(m.params.items())))
        if key in out:
            out[key].members.append(m)
        else:
            out[key] = _Compute(m)
    return list(out.values())


def _each(members: Iterable[_Member], fn: Callable[[_Member], None]) -> None:
    """`fn` for every member still live; a member whose result is refused (DistSvcError: not
    finite, or beyond memory) fails alone, the others go on."""
    for m in members:
        if m.error is None:
            try:
                fn(m)
            except DistSvcError as e:
                m.fail(e)


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
        self.targets = job.targets
        self.device = torch.device(device)
        config = job.config
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
        self._share = 1  # targets the way through the unit in progress feeds

    def run(self, unit: Unit, ticket: Ticket | None = None) -> list[UnitResult]:
        """Merge one unit for each target it feeds (`unit.variants`; the job's first target when
        it names none), reading its inputs once. `ticket`: its admission to a memory budget,
        which a full-SVD fallback exchanges for that path's larger footprint (dist_svc.memory).
        One result per target; a target whose result is refused (not finite) gets its error and
        the others go on."""
        start = time.perf_counter()
        read_before = self.reader.seconds
        self._ticket = ticket
        members = [_Member(i, u, self.targets[i], _WriteBehind(self.targets[i].layout.writer(u.name, self.sync),
                                                                 self._writes))
                   for i, u in (unit.variants or ((0, unit),))]
        try:
            for path, group in self._paths(members):
                self._share = len(group)
                path(group)
            digests = [None if m.error else m.writer.close() for m in members]
        except BaseException as e:
            for m in members:
                m.writer.abort()
            if isinstance(e, Exception) and not isinstance(e, (DistSvcError, OSError)):
                # A bug (of a method, or of dist-svc with an input it does not expect): one
                # paragraph naming the tensor, not a traceback; storage errors keep their own words.
                raise DistSvcError(
                    f"tensor '{unit.name}': merging it with {members[0].config.merge_method} failed "
                    f"({type(e).__name__}: {str(e)[:300]}). Nothing of it was recorded; the tensors finished "
                    f"so far are kept. This is a bug: please report it with this message (`dist-svc status` "
                    f"shows how far the merge came).") from e
            raise
        seconds = time.perf_counter() - start
        results = []
        for j, (m, digest) in enumerate(zip(members, digests)):
            stages = dict(m.writer.seconds)
            if j == 0:  # the shared work is counted once
                stages["read"] = self.reader.seconds - read_before
                writes = sum(sum(other.writer.seconds.values()) for other in members)
                stages["compute"] = max(0.0, seconds - stages["read"] - writes)
            results.append(UnitResult(m.unit.name, digest, seconds, m.stats, stages, m.target, m.error))
        return results

    def _paths(self, members: list[_Member]) -> list[tuple[Callable[[list[_Member]], None], list[_Member]]]:
        """The ways through the unit, each with the members that take it; members that take the
        same way share its reads."""
        paths: dict[tuple, list[_Member]] = {}
        for m in members:
            u = m.unit
            if u.copied:
                key = ("_copied",)
            elif whole_tensor(u, m.method):
                key = ("_whole",)
            elif u.calibrate:
                key = ("_calibrated", oriented(u.shape, m.config.calibration.side)[0])
            else:
                key = ("_plain",)
            paths.setdefault(key, []).append(m)
        return [(getattr(self, key[0]), group) for key, group in paths.items()]

    # -- the ways through a unit ---------------------------------------------------------------

    def _copied(self, members: list[_Member]) -> None:
        unit = members[0].unit
        for block, raw in self.reader.stored(unit):
            data = tensor_bytes(raw)
            for m in members:
                m.writer.write(data)
            self._advance(unit, block, 1)

    def _plain(self, members: list[_Member]) -> None:
        unit = members[0].unit
        computes = _computes(members)
        blocks = self.reader.blocks(unit)
        for block, tensors in self._passes(unit, blocks, computes):
            base, merged, _ = self._merged(unit, block, tensors, computes)
            self._emit(computes, base, merged)
            self._advance(unit, block, 1)

    def _emit(self, computes: list[_Compute], base: torch.Tensor | None, merged: dict) -> None:
        """Each member's block, uncalibrated, in its output dtype, to its writer."""
        for c in computes:
            live = c.live
            for j, m in enumerate(live):
                def write(m: _Member, last: bool = j == len(live) - 1, c: _Compute = c) -> None:
                    value = m.scaled(merged[c])
                    if c.method.operates_on == "weights":
                        out = _finite(value.to(DTYPES[m.unit.out_dtype][0]), m.unit,
                                      f"the merged tensor in {ST_TO_NAME[m.unit.out_dtype]}")
                    else:  # in place, once the shared result is no longer needed
                        out = self._finish(base, value, m.unit, own=last or value is not merged[c])
                    m.writer.write(tensor_bytes(out))

                _each([m], write)

    def _passes(self, unit: Unit, blocks: list[Block], computes: list[_Compute]
                ) -> Iterable[tuple[Block, list[torch.Tensor]]]:
        """The unit's blocks for the pass that merges them. A method with a streaming form
        (`memory.streamed`) first runs its reductions, each a pass over the blocks (each
        compute's in turn); the inputs' blocks are kept from the first pass to the last while
        they fit (`memory.keeps_inputs`), else each pass reads them again."""
        passes = [c for c in computes if streamed(unit, c.method)]
        if not passes:
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
        for c in passes:
            c.output_pass = drive(c.method.passes, c.params, extent,
                                  lambda c=c: ((self._views(unit, c, t), self._where(unit, b)) for b, t in each_block()))
            c.restart()
        if not (read and kept):
            return self.reader.stream(unit, blocks)

        def consumed():  # the last pass frees each block as it goes
            for j, item in enumerate(kept):
                kept[j] = None
                yield item

        return consumed()

    def _calibrated(self, members: list[_Member]) -> None:
        """Pass 1: the Grams of each compute's merged delta (one per calibration side), and the
        task vectors; an eigh; pass 2: each member's delta from the rotation its solution shares."""
        unit = members[0].unit
        transposed = oriented(unit.shape, "column")[0]
        n = unit.shape[0] if transposed else unit.shape[1]
        computes = _computes(members)
        grams = self._grams(unit, computes, n)
        blocks = self.reader.blocks(unit, transposed)
        keep = (1 + len(computes)) * math.prod(unit.shape) * torch.finfo(self.compute_dtype).bits // 8 \
            <= self.cache_bytes
        cache: list[tuple[torch.Tensor | None, dict] | None] = []
        for block, tensors in self._passes(unit, blocks, computes):  # pass 1: Grams
            base, merged, taus = self._merged(unit, block, tensors, computes, taus=True)
            for c in computes:
                merged[c] = self._delta(c, base, merged[c])
                _each(c.members, lambda m, c=c: _finite(merged[c], m.unit, "the base method's result"))
            for (c, _), gram in grams.items():
                if c.live:
                    gram.add(merged[c], taus)
            if keep:
                cache.append((base, merged))
            del taus
            self._advance(unit, block, 0.5)
        for (c, _), gram in grams.items():
            for matrix in (gram.gram, *gram.cross, *(gram.task_grams or ())):
                _each(c.members, lambda m: _finite(matrix, m.unit, "the calibration's float64 Gram matrices"))
        if any(g.needs_projections for g in grams.values()):  # the row side without task Grams: the task vectors once more
            for block, tensors in self.reader.stream(unit, blocks):
                taus = self._taus(unit, tensors, in_place=True)
                for g in grams.values():
                    if g.needs_projections:
                        g.add_projections(taus)
        self._solve(members)
        trusted = [m for m in members if m.error is None and m.solution.trusted]

        # A wide matrix is produced by columns: written in place where the writer can, else
        # assembled here.
        outs = {m: torch.empty(unit.shape, dtype=DTYPES[m.unit.out_dtype][0])
                for m in trusted if transposed and not m.writer.columns}
        for c in computes:
            c.restart()
        again = ((block, None) for block in blocks) if keep else self.reader.stream(unit, blocks)
        for j, (block, tensors) in enumerate(again if trusted else ()):  # pass 2: Wm' block by block
            if keep:
                base, merged = cache[j]
                cache[j] = None  # free as we go
            else:
                base, merged, _ = self._merged(unit, block, tensors, computes)
                merged = {c: self._delta(c, base, value) for c, value in merged.items()}
            for c in computes:
                rotated: dict[int, torch.Tensor] = {}  # per calibration: the block in its eigenbasis
                for m in c.members:
                    if m.error is not None or not m.solution.trusted:
                        continue
                    v = m.solution.v
                    if id(v) not in rotated:
                        rotated[id(v)] = GramSolution.rotate(v, merged[c])

                    def write(m: _Member, r=rotated[id(v)]) -> None:
                        result = self._finish(base, m.solution.finish(r), m.unit)
                        if m in outs:
                            outs[m][:, block.start:block.stop] = result.T.cpu()
                        elif transposed:
                            m.writer.write_columns(block.start, block.stop, tensor_bytes(result.T))
                        else:
                            m.writer.write(tensor_bytes(result))

                    _each([m], write)
            self._advance(unit, block, 0.5)
        for m, out in outs.items():
            _each([m], lambda m: m.writer.write(tensor_bytes(out)))
        cache.clear()
        for m in members:
            if m.error is None and m.solution.trusted:
                m.stats = calibration_summary(m.solution.singular_values, m.solution.eta, "gram", m.solution.overlaps)
        untrusted = [m for m in members if m.error is None and not m.solution.trusted]
        for c in computes:
            c.output_pass = c.blockwise = None  # the fallback runs the method on the whole tensors
        if untrusted:
            del grams, cache
            for m in members:
                m.gram = m.solution = None
            try:
                self._exchange(unit, untrusted[0].config)
            except DistSvcError as e:
                for m in untrusted:
                    m.fail(e)
                return
            needed = [c for c in computes if any(m in untrusted for m in c.members)]
            base, merged, taus = self._whole_inputs(unit, needed)
            _each(untrusted, lambda m: self._fallback(m, base, self._delta_of(m, needed, base, merged), taus))

    def _grams(self, unit: Unit, computes: list[_Compute], n: int) -> dict:
        """One Gram calibration per compute and calibration side; each member takes its own."""
        grams: dict[tuple[_Compute, str], GramCalibration] = {}
        for c in computes:
            for m in c.members:
                side = oriented(unit.shape, m.config.calibration.side)[1]
                if (c, side) not in grams:
                    grams[(c, side)] = GramCalibration(n, len(unit.fine_tunes), unit.alpha, side, device=self.device)
                m.gram = grams[(c, side)]
        return grams

    def _solve(self, members: list[_Member]) -> None:
        for m in members:
            if m.error is None:
                m.solution = m.gram.solve(m.scale, m.unit.alpha, m.config.calibration.target)

    def _exchange(self, unit: Unit, config: MergeConfig) -> None:
        """Trade the unit's admission for the full-SVD fallback's footprint, or refuse it."""
        if self._ticket is None:
            return
        wanted = fallback_footprint(unit, config, self.device.type == "cuda")
        if not wanted.fits(self._ticket.limit):
            raise DistSvcError(f"tensor '{unit.name}' needs its exact SVD ({_gib(wanted)} GiB; the Gram path "
                               f"cannot resolve its spectrum), more than the memory limit of "
                               f"{_gib(self._ticket.limit)} GiB. Raise --memory-limit, or merge it on a "
                               f"machine with more memory; the tensors finished so far are kept.")
        self._ticket.exchange(wanted)

    def _whole_inputs(self, unit: Unit, computes: list[_Compute]):
        """(base, each compute's result, task vectors) on the whole tensors."""
        block = self.reader.whole(unit.shape)
        return self._merged(unit, block, self._inputs_whole(unit), computes, taus=True)

    def _delta_of(self, m: _Member, computes: list[_Compute], base, merged: dict) -> torch.Tensor:
        c = next(c for c in computes if m in c.members)
        return m.scaled(self._delta(c, base, merged[c]))

    def _fallback(self, m: _Member, base: torch.Tensor | None, delta: torch.Tensor, taus: list[torch.Tensor]) -> None:
        """A member's calibration by full SVD, on whole tensors."""
        cal = m.config.calibration
        result = calibrate_singular_values(delta, taus, m.unit.alpha, cal.side, cal.target)
        m.writer.write(tensor_bytes(self._finish(base, result.delta, m.unit)))
        m.stats = calibration_summary(result.singular_values, result.eta, "svd-fallback", result.overlaps)

    def _whole(self, members: list[_Member]) -> None:
        """Methods that need whole tensors (every input at once): read once for every member."""
        unit = members[0].unit
        computes = _computes(members)
        calibrated = [m for m in members if m.unit.calibrate]
        base, merged, taus = self._merged(unit, self.reader.whole(unit.shape), self._inputs_whole(unit), computes,
                                          taus=bool(calibrated))
        if calibrated:  # before the plain members': those may take the shared result in place
            self._whole_calibrated(unit, calibrated, computes, base, merged, taus)
        for c in computes:
            c.members = [m for m in c.members if not m.unit.calibrate]
        self._emit([c for c in computes if c.members], base, merged)

    def _whole_calibrated(self, unit: Unit, members: list[_Member], computes: list[_Compute], base, merged: dict,
                          taus: list[torch.Tensor]) -> None:
        transposed = oriented(unit.shape, "column")[0]
        n = unit.shape[0] if transposed else unit.shape[1]
        mine = [c for c in computes if any(m in members for m in c.members)]
        deltas = {c: self._delta(c, base, merged[c]) for c in mine}
        oriented_taus = [t.T if transposed else t for t in taus]
        grams: dict = {}
        for c in mine:
            wm = deltas[c].T if transposed else deltas[c]
            group = [m for m in c.members if m in members]
            _each(group, lambda m: _finite(deltas[c], m.unit, "the base method's result"))
            for matrix in (deltas[c], *taus):  # the Grams' entries are bounded by these squared norms
                _each(group, lambda m: _finite(torch.linalg.norm(matrix.double()).square(), m.unit,
                                               "the calibration's float64 Gram matrices"))
            for m in group:
                side = oriented(unit.shape, m.config.calibration.side)[1]
                if (c, side) not in grams:
                    gram = grams[(c, side)] = GramCalibration(n, len(taus), unit.alpha, side, device=self.device)
                    gram.add(wm, oriented_taus)
                    if gram.needs_projections:
                        gram.add_projections(oriented_taus)
                m.gram = grams[(c, side)]
            self._solve(group)

            def write(m: _Member) -> None:
                if not m.solution.trusted:
                    return self._fallback(m, base, m.scaled(deltas[c]), taus)
                delta = m.solution.apply(wm)
                m.writer.write(tensor_bytes(self._finish(base, delta.T if transposed else delta, m.unit)))
                m.stats = calibration_summary(m.solution.singular_values, m.solution.eta, "gram", m.solution.overlaps)

            _each(group, write)

    def _advance(self, unit: Unit, block: Block, share: float) -> None:
        if self._progress is not None and unit.shape:
            length = unit.shape[1] if block.transposed else unit.shape[0]
            self._progress(unit.name, int(share * self._share * unit.nbytes * (block.stop - block.start)
                                          / max(length, 1)))

    # -- the method on one block -----------------------------------------------------------------

    def _inputs_whole(self, unit: Unit) -> list[torch.Tensor]:
        tensors = self.reader.read(unit, None)
        if unit.vocabulary:
            from dist_svc.vocab import align

            tensors = align(self.vocabulary, tensors, [s.checkpoint for s in unit.inputs])
        return tensors

    def _where(self, unit: Unit, block: Block) -> Where:
        return Where(unit.name, lambda: flat_indices(unit.shape, block, self.device), unit.base)

    def _call(self, c: _Compute, unit: Unit, block: Block, tensors: list[torch.Tensor],
              base: torch.Tensor | None = None) -> torch.Tensor:
        if c.blockwise is not None:  # a streamed method's output pass
            return c.blockwise(tensors, self._where(unit, block))
        return c.method.merge(tensors, c.params, self._where(unit, block), base)

    def _views(self, unit: Unit, c: _Compute, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """What the method takes of a block's inputs: the weights, or the task vectors (new
        tensors: the inputs' blocks may be kept for the next pass)."""
        if c.method.operates_on == "weights":
            return tensors
        return self._taus(unit, tensors, in_place=False)

    @staticmethod
    def _taus(unit: Unit, tensors: list[torch.Tensor], in_place: bool) -> list[torch.Tensor]:
        base = None if unit.base is None else tensors[unit.base]
        if base is None:
            return [tensors[i] for i in unit.fine_tunes]
        return [tensors[i].sub_(base) if in_place else tensors[i] - base for i in unit.fine_tunes]

    def _merged(self, unit: Unit, block: Block, tensors: list[torch.Tensor], computes: list[_Compute],
                taus: bool = False) -> tuple[torch.Tensor | None, dict, list[torch.Tensor] | None]:
        """(base, each compute's result on this block, the task vectors when `taus` or a method
        needs them). A result is the merged weights for a method on weights, else the merged
        delta; at scale 1 (each member scales it)."""
        base = None if unit.base is None else tensors[unit.base]
        merged = {c: self._call(c, unit, block, tensors) for c in computes if c.method.operates_on == "weights"}
        vectors = None
        if taus or len(merged) < len(computes):
            # In place where no result may hold an input: every read is a buffer of its own, and
            # methods never change their inputs.
            vectors = self._taus(unit, tensors, in_place=not merged)
            for c in computes:
                if c not in merged:
                    merged[c] = self._call(c, unit, block, vectors, base)
        return base, merged, vectors

    @staticmethod
    def _delta(c: _Compute, base: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
        """A compute's merged delta: its result, or for a method on weights the result less the base."""
        if c.method.operates_on == "weights" and base is not None:
            return result - base
        return result

    def _finish(self, base: torch.Tensor | None, delta: torch.Tensor, unit: Unit, own: bool = True) -> torch.Tensor:
        """base + delta in the wider of the two dtypes, rounded once to the output dtype; never
        written if it is not finite (a merge that overflows is refused, not recorded). `own`: the
        delta is this block's own, added to in place."""
        out = delta if base is None else (delta.add_(base) if own else delta + base)
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
