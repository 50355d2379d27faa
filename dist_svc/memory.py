"""What a unit needs in memory, what the machine has, and admitting units while they fit.

The footprint of a unit is computed from the plan alone (its shape, its inputs, the method's
granularity, whether it is calibrated) and the worker's options (block size, pass-2 cache), by
the formulas below, which follow the worker's algorithm (dist_svc/worker.py) buffer by buffer.
They are upper bounds: `tests/test_memory.py` measures the peak resident memory of real units
against them. Notation: E elements in the tensor, b elements in a block, N inputs, F fine-tunes,
n the smaller side of a calibrated matrix, c bytes per compute element (4, or 8 with
`dtype: float64`), s = 4 bytes per element read, o bytes per output element.

- one block in flight (every path): `b * ((2N + 4) c + s + o)`: every input's block widened,
  the merged block, the method's own temporaries (at most N more), the output block; and the
  blocks read ahead meanwhile, `READ_AHEAD * b * N (c + s)`, and the output blocks waiting to
  be written, `WRITE_BEHIND * b * o`;
- calibrated, streamed: + `(F + 1) n^2 8` (the Grams: `G` and one `C_i` per fine-tune)
  + `F n^2 8` when the calibration keeps the task Grams (`T_i`: a wide matrix on its default
  side, while they take at most 2 GiB; beyond, one more pass over the inputs replaces them)
  + `3 n^2 8` (eigh's eigenvectors and its workspace; V is kept for pass 2)
  + `3 min(n^2, 16M) 8` (the overlaps' temporaries, column chunks of V) + `8 b` (pass 2's block
  in the eigenbasis) + the pass-2 cache `2 E c` when it fits `cache_bytes` (a wide matrix's
  output is written by columns, in place);
- a unit read once for several outputs (a batch, `Unit.variants`): its largest member's
  footprint, plus what each further method setting and each wide calibrated member adds
  (`_batch_footprint`);
- the full-SVD fallback of a calibrated matrix the Gram cannot resolve: `E (N c + (F + 4) 8)`,
  taken only when needed (the worker exchanges its streaming footprint for it, waiting until it
  fits: `MemoryBudget.exchange`);
- a non-float tensor, copied: `b o (1 + WRITE_BEHIND)` on the host (the block as read, the
  blocks waiting to be written);
- a method that needs the whole tensor but streams in passes (`streamed`: TIES, breadcrumbs,
  SCE, SLERP, NuSLERP, Karcher, Model Stock): the streaming path above with `(8 + 4 F c) b` more (a
  selection's boolean masks and int64 tie ranks of a block, the pruned task vectors and the sign
  election's stacks of them, and the allocator's share of these many block-sized temporaries:
  a TIES unit of K = 3 measured 65-200 bytes per element of a block, more with small blocks) and `STREAM_SLACK` (the
  histograms), plus the inputs' blocks kept between passes `N E c` while that fits
  `cache_bytes` (else every pass reads them again; calibrated, pass 1 turns them into the
  smaller pass-2 cache): independent of the tensor's size beyond `cache_bytes`;
- a method that needs the whole tensor otherwise: `E ((2N + 4) c + s + o + 8)` (the 8: a selection's
  boolean masks and candidates, or a sort's int64 indices), plus, calibrated, the Grams and workspace above and
  `3 E 8`: the calibrated delta and its product in float64, and the float64 copy of one
  matrix that bounds its Gram entries (the finite check).

On a GPU the blocks, Grams and cache live in device memory; the host holds read and write
buffers. Every unit also counts a few MiB for what it holds besides tensors, and 1/16 of its
block- and tensor-sized buffers for what the formulas do not follow (a method's small
temporaries, the allocator's rounding). The resident peak follows the live bytes because the
worker has glibc map every buffer of `MMAP_THRESHOLD` or more on its own and return it to the
system when freed (dist_svc.worker: blocks served from a shared heap fragmented it, up to 3x the
live bytes); Grams below that size come from the heap and are counted with the blocks.
"""

from __future__ import annotations

import bisect
import math
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from dist_svc.blocks import BLOCK_ELEMENTS, READ_AHEAD, block_length
from dist_svc.calibration import OVERLAP_CHUNK, keep_task_grams, oriented
from dist_svc.storage.types import ITEMSIZE

if TYPE_CHECKING:
    from dist_svc.config import MergeConfig
    from dist_svc.methods import Method
    from dist_svc.plan import Unit

WRITE_BEHIND = 2  # output blocks waiting for a worker's write thread, at most
CACHE_BYTES = 2 << 30  # pass-1 blocks kept for pass 2 up to this size, else re-read
READ_BYTES = 4  # per element read, at most (float32 inputs; bf16 read buffers are half)
MARGIN = 0.1  # of the machine's memory left to everything else, by default
MIN_MARGIN = 1 << 30
UNIT_SLACK = 4 << 20  # whatever a unit holds besides its tensors (objects, small buffers, thread stacks
# touched; 1 MiB was 1 MiB short of a small-block unit's peak in a loaded test run)
ARENA_SHARE = 16  # 1/16 of a unit's tensor bytes: small temporaries, the allocator's rounding
STREAM_SLACK = 16 << 20  # a streamed method's histograms (16-bit digits, int64, two per task at most), sums, and
# the arenas' share of its many differently sized block temporaries (measured: +10-20 MiB at small blocks)
MMAP_THRESHOLD = 1 << 20  # glibc maps allocations from this size up, returned to the system on free


@dataclass(frozen=True)
class Footprint:
    host: int
    device: int = 0

    def fits(self, other: "Footprint") -> bool:
        return self.host <= other.host and self.device <= other.device


def compute_bytes(config: "MergeConfig") -> int:
    return 8 if config.dtype == "float64" else 4


def unit_footprint(unit: "Unit", config: "MergeConfig", on_gpu: bool = False,
                   block_elements: int = BLOCK_ELEMENTS, cache_bytes: int = CACHE_BYTES,
                   configs: Sequence["MergeConfig"] = ()) -> Footprint:
    """The most memory `Worker.run(unit)` holds at once on its streaming path (the module's
    docstring has the formulas). `configs`: the job's targets' configs, for a unit that feeds
    several (`Unit.variants`; `config` is the first's)."""
    if len(unit.variants) > 1:
        return _batch_footprint(unit, configs or [config], on_gpu, block_elements, cache_bytes)
    if unit.variants:
        unit = unit.variants[0][1]
    c, o, s = compute_bytes(config), ITEMSIZE[unit.out_dtype], READ_BYTES
    n_in, f = len(unit.inputs), len(unit.fine_tunes)
    elements = math.prod(unit.shape) if unit.shape else 1
    if unit.copied:  # its bytes as read, on the host, and the blocks waiting to be written
        block = min(elements, block_length(unit, False, block_elements) * (elements // _length(unit, False)))
        return _placed(0, block * o * (1 + WRITE_BEHIND), on_gpu)
    per_element = (2 * n_in + 4) * c + s + o
    if whole_tensor(unit, config.method):
        compute = elements * (per_element + 8)
        grams = 0
        if unit.calibrate:
            compute += 3 * elements * 8
            grams = _grams(unit, config, f)
            if min(unit.shape) ** 2 * 8 < MMAP_THRESHOLD:  # small Grams come from the pooled heap too
                compute, grams = compute + grams, 0
        return _placed(compute, elements * (s + o), on_gpu, grams)
    transposed = unit.calibrate and oriented(unit.shape, config.calibration.side)[0]
    block = min(elements, block_length(unit, transposed, block_elements) * (elements // _length(unit, transposed)))
    passes = streamed(unit, config.method)
    if passes:  # a selection's masks and int64 ranks of the block; the sign election's stacks
        per_element += 8 + 4 * f * c
    compute = block * (per_element + READ_AHEAD * n_in * (c + s)) + (STREAM_SLACK if passes else 0)
    host_only = block * (s + o + WRITE_BEHIND * o)
    grams = 0
    # Blocks kept between passes: the pass-2 cache of a calibrated unit, and a streamed unit's
    # inputs (pass 1 of the calibration consumes them as it fills the smaller pass-2 cache).
    kept = n_in * elements * c if passes and keeps_inputs(unit, config, cache_bytes) else 0
    if unit.calibrate:
        compute += 8 * block  # pass 2: the block in the eigenbasis, beside its product
        grams = _grams(unit, config, f)
        if min(unit.shape) ** 2 * 8 < MMAP_THRESHOLD:
            compute, grams = compute + grams, 0
        if 2 * elements * c <= cache_bytes:
            kept = max(kept, 2 * elements * c)  # kept as the blocks they were read in
    compute += kept

    return _placed(compute, host_only, on_gpu, grams)


def _batch_footprint(unit: "Unit", configs: Sequence["MergeConfig"], on_gpu: bool, block_elements: int,
                     cache_bytes: int) -> Footprint:
    """A unit read once for several targets: the largest member's own footprint (members are
    handled one after another on each block, their products freed and their output blocks
    queued for the one write thread, whose queue the footprint counts once), and
    - for each further computation of the method (settings that differ beyond its scale): its
      result block and its rotation `b (c + 8)`, its share of the pass-2 cache `E c` when the
      unit keeps one, its Grams when calibrated;
    - for each further member of a wide calibrated matrix, its output assembled by columns
      `E o` (where the writer cannot write columns in place)."""
    members = [(u, configs[i] if i < len(configs) else configs[0]) for i, u in unit.variants]
    own = [unit_footprint(u, cfg, on_gpu, block_elements, cache_bytes) for u, cfg in members]
    size = (lambda fp: fp.device) if on_gpu else (lambda fp: fp.host)
    first = max(range(len(members)), key=lambda j: size(own[j]))
    u, cfg = members[first]
    if u.copied:
        return own[first]
    c, o = compute_bytes(cfg), ITEMSIZE[u.out_dtype]
    elements = math.prod(u.shape) if u.shape else 1
    whole = whole_tensor(u, cfg.method)
    transposed = u.calibrate and oriented(u.shape, cfg.calibration.side)[0]
    block = elements if whole else \
        min(elements, block_length(u, transposed, block_elements) * (elements // _length(u, transposed)))
    compute, grams = 0, 0
    computes = {_compute_key(u, cfg)}
    kept = u.calibrate and (1 + len({_compute_key(v, k) for v, k in members})) * elements * c <= cache_bytes
    for j, (v, k) in enumerate(members):
        if j == first:
            continue
        key = _compute_key(v, k)
        if key not in computes:
            computes.add(key)
            compute += block * (c + 8) + (elements * c if kept else 0)
            if v.calibrate:
                grams += _grams(v, k, len(v.fine_tunes))
        elif transposed and not whole:
            compute += elements * o
    extra = _placed(compute, 0, on_gpu, grams)
    return Footprint(own[first].host + extra.host - UNIT_SLACK, own[first].device + extra.device)


def _compute_key(unit: "Unit", config: "MergeConfig") -> tuple:
    """What decides a member's computation of the method (the worker's `_computes`)."""
    method = config.method
    if unit.copied:
        return ("copied",)
    params = unit.call_params(method)
    if method.scale in params:
        params[method.scale] = 1.0
    side = config.calibration.side if unit.calibrate else None
    return method.name, repr(sorted(params.items())), unit.calibrate, side


def fallback_footprint(unit: "Unit", config: "MergeConfig", on_gpu: bool = False) -> Footprint:
    """The full-SVD fallback of a calibrated matrix: whole inputs, float64 SVD factors."""
    elements = math.prod(unit.shape)
    compute = elements * (len(unit.inputs) * compute_bytes(config) + (len(unit.fine_tunes) + 4) * 8)
    return _placed(compute, elements * (READ_BYTES + ITEMSIZE[unit.out_dtype]), on_gpu)


def whole_tensor(unit: "Unit", method: "Method | None" = None) -> bool:
    """Whether the worker reads every input's whole tensor at once (not in blocks): a method
    that needs it and has no streaming form (`method`: the merge's; None counts as none)."""
    if unit.needs == "tensor":
        return method is None or not streamed(unit, method)
    if unit.needs == "row":  # blocks of rows hold whole rows, column blocks do not
        return len(unit.shape) < 2 or (unit.calibrate and oriented(unit.shape, "column")[0])
    return False


def streamed(unit: "Unit", method: "Method") -> bool:
    """Whether the worker runs a whole-tensor method in passes over blocks (its streaming form,
    `Method.passes`): every such unit but a vocabulary tensor (aligned token by token, whole)
    and a merge without task vectors (the base, as it is)."""
    return (unit.needs == "tensor" and method.passes is not None and not unit.vocabulary
            and (method.operates_on == "weights" or bool(unit.fine_tunes)))


def keeps_inputs(unit: "Unit", config: "MergeConfig", cache_bytes: int = CACHE_BYTES) -> bool:
    """Whether a streamed unit keeps its inputs' blocks between passes (else each pass reads
    them again): while every input's whole tensor, widened, fits `cache_bytes`."""
    return len(unit.inputs) * math.prod(unit.shape) * compute_bytes(config) <= cache_bytes


def _grams(unit: "Unit", config: "MergeConfig", fine_tunes: int) -> int:
    small = min(unit.shape)
    transposed, side = oriented(unit.shape, config.calibration.side)
    task_grams = fine_tunes if side == "row" and keep_task_grams(small, fine_tunes) else 0
    return (fine_tunes + 1 + task_grams + 3) * small * small * 8 + 3 * min(small * small, OVERLAP_CHUNK) * 8


def _length(unit: "Unit", transposed: bool) -> int:
    return max(1, unit.shape[1] if transposed else unit.shape[0]) if unit.shape else 1


def _placed(compute: int, host_only: int, on_gpu: bool, grams: int = 0) -> Footprint:
    """`compute` and `host_only`: buffers of up to block or tensor size, which the allocator
    pools (the arena share is added on the host); `grams`: the n x n matrices, each one
    allocation of its own, returned to the system when freed."""
    if not on_gpu:
        compute += compute // ARENA_SHARE
    compute += grams
    host_only += host_only // ARENA_SHARE + UNIT_SLACK
    return Footprint(host_only, compute) if on_gpu else Footprint(compute + host_only, 0)


def too_big(unit: "Unit", need: Footprint, limit: Footprint) -> str:
    """The refusal of a unit that can never fit `limit`."""
    from dist_svc.progress import human_bytes

    where = "GPU memory" if need.device > limit.device else "memory"
    have, want = (limit.device, need.device) if where == "GPU memory" else (limit.host, need.host)
    return (f"tensor '{unit.name}' {list(unit.shape)} needs about {human_bytes(want)} of {where} to merge, more than "
            f"the limit of {human_bytes(have)}. Raise the limit (--memory-limit) or use a machine with more; nothing "
            f"was written.")


# -- what the machine has ------------------------------------------------------------------------

def memory_available() -> int:
    """Bytes this process may still use: the kernel's MemAvailable, or less under a cgroup
    (container) limit."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            cap = open(limit).read().strip()
            if cap != "max" and int(cap) < 1 << 60:
                available = min(available, int(cap) - int(open(usage).read().strip()))
        except (OSError, ValueError):
            continue
    return max(available, 0)


def default_budget(available: int | None = None) -> int:
    """What merging may use by default: what the machine has, minus a margin (10%, at least
    1 GiB) for everything else."""
    available = memory_available() if available is None else available
    return max(available - max(int(available * MARGIN), MIN_MARGIN), 0)


def device_budget(device) -> int:
    """Free memory of a GPU, minus the same margin."""
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return default_budget(free)


# -- admission -------------------------------------------------------------------------------------

class MemoryBudget:
    """Memory shared by units in flight in one process: host memory, and each GPU's memory
    (`devices`: one limit per device; none on a CPU). `take` hands out the largest pending unit
    that fits what is left on the host and on the taker's device (so small units fill in beside
    a large one), `exchange` lets a running unit trade its footprint for a larger one (waiting
    until it fits; it holds nothing while it waits, so units waiting on each other cannot
    deadlock)."""

    def __init__(self, host: int, devices: Sequence[int] = ()):
        self.host, self.devices = host, list(devices)
        self._host_used = 0
        self._device_used = [0] * len(self.devices)
        self.peak_units = 0  # the most units in flight at once
        self._running = 0
        self._cond = threading.Condition()

    def limit(self, device: int | None = None) -> Footprint:
        return Footprint(self.host, self.devices[device] if device is not None else 0)

    def _free(self, device: int | None) -> Footprint:
        used = self._device_used[device] if device is not None else 0
        return Footprint(self.host - self._host_used, self.limit(device).device - used)

    def _add(self, fp: Footprint, device: int | None, sign: int) -> None:
        self._host_used += sign * fp.host
        if device is not None:
            self._device_used[device] += sign * fp.device

    def take(self, pending: "Pending", stop: threading.Event, device: int | None = None) -> "Ticket | None":
        """The largest pending unit that fits now (on `device`, if the budget has devices),
        admitted; waits while none does; None when nothing is pending or `stop` is set."""
        with self._cond:
            while not stop.is_set():
                if not pending:
                    return None
                item = pending.pop_fitting(self._free(device))
                if item is not None:
                    return self._admitted(*item, device)
                self._cond.wait(0.5)
            return None

    def admit(self, unit: "Unit", fp: Footprint, device: int | None = None) -> "Ticket":
        """Admit one unit, waiting until it fits (a Ray actor's units arrive one at a time)."""
        with self._cond:
            while not fp.fits(self._free(device)):
                self._cond.wait(0.5)
            return self._admitted(unit, fp, device)

    def _admitted(self, unit: "Unit", fp: Footprint, device: int | None) -> "Ticket":
        self._add(fp, device, +1)
        self._running += 1
        self.peak_units = max(self.peak_units, self._running)
        return Ticket(self, unit, fp, device)

    def _exchange(self, held: Footprint, wanted: Footprint, device: int | None) -> None:
        with self._cond:
            self._add(held, device, -1)
            self._cond.notify_all()
            while not wanted.fits(self._free(device)):
                self._cond.wait(0.5)
            self._add(wanted, device, +1)

    def _release(self, held: Footprint, device: int | None) -> None:
        with self._cond:
            self._add(held, device, -1)
            self._running -= 1
            self._cond.notify_all()


class Ticket:
    """One admitted unit's share of a budget (on one device, when the budget has devices)."""

    def __init__(self, budget: MemoryBudget, unit: "Unit", held: Footprint, device: int | None = None):
        self.budget, self.unit, self.held, self.device = budget, unit, held, device

    @property
    def limit(self) -> Footprint:
        return self.budget.limit(self.device)

    def exchange(self, wanted: Footprint) -> None:
        """Give back what is held, then wait until `wanted` fits and hold it instead."""
        self.budget._exchange(self.held, wanted, self.device)
        self.held = wanted

    def release(self) -> None:
        self.budget._release(self.held, self.device)
        self.held = Footprint(0, 0)


class Pending:
    """Units waiting to run, largest footprint first; `pop_fitting` finds the largest that fits
    in O(log n) (a 47k-tensor merge asks once per unit)."""

    def __init__(self, items: Sequence[tuple["Unit", Footprint]], key: Callable[[Footprint], int]):
        self._items = sorted(items, key=lambda item: key(item[1]))  # ascending
        self._keys = [key(fp) for _, fp in self._items]
        self._key = key

    def __len__(self) -> int:
        return len(self._items)

    def pop_fitting(self, free: Footprint):
        i = bisect.bisect_right(self._keys, self._key(free)) - 1
        while i >= 0 and not self._items[i][1].fits(free):  # the other dimension does not fit
            i -= 1
        if i < 0:
            return None
        del self._keys[i]
        return self._items.pop(i)
