"""The dry run's estimate (`dist-svc merge --dry-run`, `dist_svc.dry_run`): the plan in numbers,
from metadata and probes of this machine.

Nothing is merged and nothing is written. Bytes and memory are exact consequences of the plan
(memory: dist_svc.memory's footprints, the largest and whether it fits); only the units still
to run count (a resumed merge's finished ones do not; a finished merge is probed not at all).
The time is a model with measured rates, each probed several times (the median counts, and a
probe is repeated at a larger size while its rounds disagree by more than 20%).

Probes are in proportion to the job: all of them, every round and larger repeat included, read
at most PROBE_SHARE of the bytes the merge reads (and at least one row a read) and compute at
most PROBE_SHARE of its elements, Gram flops and eigh work (`Estimate.probe_bytes` counts what
was read), so that a dry run of a merge of seconds takes a fraction of those seconds. A tiny
probe overstates the cost per byte or flop (fixed costs weigh more): a tiny job's estimate errs
long.

- reading: the inputs' largest tensors read as workers read them, by one worker and by all of
  them at once (what the storage gives in parallel), from where they are (local files or
  object storage); and the time of one small read (a request's latency: object storage's
  round trip, counted once per block a worker reads);
- the merge of a block: the real method function on blocks of the unit's shape and dtypes,
  with the widening, the base added back, the rounding to the output dtype and the checksum of
  the output (the plain path end to end, per element);
- calibration: float64 matrix products on one thread (`2 m n^2` flops per Gram, per pass-2
  projector), `eigh` at the size of the largest calibrated matrix's smaller side (scaled by n^3
  from a probe of at most 1024), and what a calibrated unit costs whatever its size: the whole
  Gram path on the plan's smallest calibrated shape (at most 64 x 64), plus a constant for the
  worker's side of a calibrated unit (measured on this project's MoE benchmark);
- per unit: a fixed cost in the driver's thread, which records units one after another
  (measured on this project's MoE benchmark, docs/benchmarks.md), and the plan built once
  before the first unit starts (the dry run's own opening of the inputs and planning, timed);
- writing: at the probed read rate and latency, one request per unit (the output is a quarter
  of the input for K = 3). Writes are not probed (a probe would write to the output): an
  output on object storage is counted at the inputs' rates, which the dry run says.

A worker does its unit's reads, then its arithmetic; W workers overlap each other, as much as
the probe of W at once showed (a machine busy with other work gives less than W times one).
The time is the largest of: the workers' summed time divided by W times that share, all bytes
at the storage's parallel rate, and the longest single unit; plus the driver's per-unit records
and the plan.
"""

from __future__ import annotations

import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch

from dist_svc.blocks import BLOCK_ELEMENTS
from dist_svc.calibration import calibrate_gram, oriented
from dist_svc.config import MergeConfig
from dist_svc.executors import Capacity
from dist_svc.memory import Footprint, compute_bytes, unit_footprint
from dist_svc.methods import Where
from dist_svc.plan import Plan, Unit
from dist_svc.storage.checksum import checksum
from dist_svc.storage.types import DTYPES, tensor_bytes
from dist_svc.worker import CPU_INTRA_OP_THREADS

PROBE_BYTES = 256 << 20  # read per round, at most
PROBE_ELEMENTS = 1 << 22  # elements of a probe block, at most
PROBE_SHARE = 0.1  # of the job's bytes and work, what all probes together may spend at most
ROUNDS, GROWTHS = 3, 2  # of _median_until_stable: at most 3 * (1 + 2 + 4) = 21 times scale 1's cost
_SCALE_SUM = ROUNDS * sum(2 ** g for g in range(GROWTHS + 1))
UNIT_OVERHEAD_S = 0.4e-3  # per unit, in the driver's thread (measured: 47k-tensor MoE, docs/benchmarks.md)
# per calibrated unit in its worker, beyond the Gram path itself: its second pass over the
# inputs, the finite checks of its Grams, its summary (measured: the 1.5k-tensor MoE of
# `dist-svc bench estimate`, where it is most of the time)
CALIBRATED_UNIT_OVERHEAD_S = 3e-3
STABLE = 0.2  # a probe's rounds may disagree by this much
# One H100 (docs/benchmarks.md): the calibration kernel on an 8192 x 8192 matrix, K = 3, and
# what a node's disk gave a plain parallel read; for projections onto GPU clusters.
H100_CALIBRATION_S_8192 = 0.81
H100_READ_RATE = 1.5e9


@dataclass(frozen=True)
class Estimate:
    tensors: int
    calibrated: int
    read_bytes: int
    write_bytes: int
    largest: tuple[str, Footprint]  # the unit with the largest footprint, and it
    gram_flops: float
    read_rate: float  # bytes/s, one worker, probed
    parallel_read_rate: float  # bytes/s, every worker at once, probed
    latency: float  # seconds of one small read (a request), probed
    flop_rate: float  # float64 flop/s of one worker, probed
    element_seconds: float  # the plain path, per element, probed
    parallel: float  # workers at once against workers times one, probed (at most 1)
    workers: int
    seconds: float
    gpu_seconds: dict  # "N x 8 GPUs" -> seconds, projected from H100 figures
    probe_bytes: int  # what the probes read, at most PROBE_SHARE of read_bytes

    @property
    def worker_memory_bytes(self) -> int:
        return max(self.largest[1].host, self.largest[1].device)


def at_once(need: Footprint, capacity: Capacity) -> int:
    """How many units that each need `need` run at once on an executor's `capacity`: in each of
    its pools as many as the pool's memory holds, at most its units in flight (a GPU memory not
    known before the pool starts, 0, bounds nothing here)."""
    per_pool = min(capacity.per_pool, capacity.memory.host // max(need.host, 1),
                   capacity.memory.device // max(need.device, 1) if need.device and capacity.memory.device
                   else capacity.per_pool)
    return capacity.pools * per_pool


def estimate(config: MergeConfig, plan: Plan, base, models, device: str, workers: int,
             units: Sequence[Unit] | None = None, plan_seconds: float = 0.0) -> Estimate:
    """The estimate of running `units` (default: the whole plan) with `workers` on `device`;
    `plan_seconds`: what opening the inputs and planning took (the merge does it again)."""
    checkpoints = [base, *models]
    units = plan.units if units is None else tuple(units)
    workers = max(1, workers)
    on_gpu = device.startswith("cuda")

    def unit_read(u: Unit) -> int:
        return sum(checkpoints[s.checkpoint].tensors[s.tensor].nbytes for s in u.inputs)

    read_bytes = sum(unit_read(u) for u in units)
    calibrated = [u for u in units if u.calibrate]
    job_flops = sum(_calibration_flops(u, config) for u in calibrated)
    largest_n = max((min(u.shape) for u in calibrated), default=0)
    if not units:  # nothing left to run: nothing to probe
        return Estimate(tensors=0, calibrated=0, read_bytes=0, write_bytes=0, largest=("", Footprint(0, 0)),
                        gram_flops=0.0, read_rate=0.0, parallel_read_rate=0.0, latency=0.0, flop_rate=0.0,
                        element_seconds=0.0, parallel=1.0, workers=workers, seconds=0.0, gpu_seconds={}, probe_bytes=0)
    probe = _Probe(PROBE_SHARE * read_bytes)
    latency, read_one, read_all = _read_rates(checkpoints, workers, probe)
    flop_rate = _flop_rate(device, PROBE_SHARE * job_flops) if job_flops else 0.0
    element_seconds, parallel = _element_seconds(config, units, checkpoints, device, workers,
                                                 PROBE_SHARE * sum(math.prod(u.shape) for u in units))
    eigh_seconds = _eigh_seconds(largest_n, device, PROBE_SHARE * sum(min(u.shape) ** 3 for u in calibrated))
    calibrated_fixed = _calibration_fixed_seconds(config, calibrated, device)

    total_read, total_cpu, longest, gpu_cal = 0, 0.0, 0.0, 0.0
    largest = ("", Footprint(0, 0))
    for u in units:
        read = unit_read(u)
        elements = math.prod(u.shape) if u.shape else 1
        cpu = 0.0 if u.copied else elements * element_seconds * max(len(u.inputs), 1) / 4
        reread = 0
        if u.calibrate:
            n = min(u.shape)
            cpu += (CALIBRATED_UNIT_OVERHEAD_S + calibrated_fixed + _calibration_flops(u, config) / flop_rate
                    + eigh_seconds * (n / largest_n) ** 3)
            if 2 * elements * compute_bytes(config) > (2 << 30):
                reread = read  # pass 2 reads the inputs again
            gpu_cal += H100_CALIBRATION_S_8192 * (max(u.shape) * n * n) / 8192 ** 3
        # a request per block of each input, per pass, and one for the output
        requests = len(u.inputs) * math.ceil(elements / BLOCK_ELEMENTS) * (2 if reread else 1) + 1
        read_s = (read + reread + u.nbytes) / read_one + requests * latency
        total_read += read + reread + u.nbytes
        total_cpu += read_s + cpu
        longest = max(longest, read_s + cpu)
        fp = unit_footprint(u, config, on_gpu)
        if max(fp.host, fp.device) > max(largest[1].host, largest[1].device):
            largest = (u.name, fp)
    # Workers in parallel, bounded by the storage and by the longest unit; the driver records
    # every unit in its own thread (serial), and plans once before any unit starts.
    seconds = (max(total_cpu / (workers * parallel), total_read / read_all, longest) + len(units) * UNIT_OVERHEAD_S
               + plan_seconds)
    gpu_seconds = {f"{nodes} x 8 GPUs": max(total_read / (H100_READ_RATE * nodes), gpu_cal / (8 * nodes))
                   for nodes in (1, 4)}
    return Estimate(len(units), len(calibrated), read_bytes, sum(u.nbytes for u in units), largest, job_flops,
                    read_one, read_all, latency, flop_rate, element_seconds, parallel, workers, seconds,
                    gpu_seconds, probe.spent)


class _Probe:
    """Bytes the read probes may still read (of `allowance`), and what they read."""

    def __init__(self, allowance: float):
        self.allowance = allowance
        self.spent = 0

    def per_round(self, share: float) -> int:
        """Bytes of one round at scale 1 of a probe given `share` of the allowance, so that
        every round at every scale fits it."""
        return int(min(PROBE_BYTES, self.allowance * share / _SCALE_SUM))


def _calibration_flops(u: Unit, config: MergeConfig) -> float:
    m, n = max(u.shape), min(u.shape)
    f = len(u.fine_tunes)
    _, side = oriented(u.shape, config.calibration.side)
    grams = f + 1 + (f if side == "row" else 0)
    return 2.0 * m * n * n * (grams + 1)  # the Grams, then Wm P in pass 2


def _median_until_stable(measure, rounds: int = ROUNDS, growths: int = GROWTHS) -> float:
    """The median of `rounds` measurements of `measure(scale)`, repeated at twice the scale
    while they disagree by more than STABLE (at most `growths` times)."""
    scale = 1
    for _ in range(growths + 1):
        values = [measure(scale) for _ in range(rounds)]
        middle = statistics.median(values)
        if middle > 0 and (max(values) - min(values)) / middle <= STABLE:
            break
        scale *= 2
    return middle


def _read_rates(checkpoints, workers: int, probe: _Probe) -> tuple[float, float, float]:
    """(seconds of one small read, bytes/s of one reader, bytes/s of `workers` readers at once),
    reading row blocks of the fine-tunes' largest tensors (each reader its own range of rows)
    as workers read them, within `probe`'s allowance (half for each rate). The rates leave the
    latency out (it is counted per request)."""
    tensors = sorted(((c, name, info) for c in checkpoints[1:] or checkpoints for name, info in c.tensors.items()
                      if info.shape and info.nbytes), key=lambda t: -t[2].nbytes)
    if not tensors:
        return 0.0, 1e9, 1e9
    targets = tensors[:workers]
    checkpoint, name, info = tensors[-1]  # the smallest: one row of it is one small request

    def small() -> float:
        start = time.perf_counter()
        got = checkpoint.read(name, rows=slice(0, 1))
        probe.spent += got.numel() * got.element_size()
        return time.perf_counter() - start

    latency = statistics.median(small() for _ in range(ROUNDS))

    def read(i: int, readers: int, budget: int) -> int:
        checkpoint, name, info = targets[i % len(targets)]
        share = max(1, info.shape[0] // max(1, readers // len(targets) + 1))
        first = (i // len(targets)) * share
        rows = max(1, min(share, budget // max(1, info.nbytes // info.shape[0])))
        got = checkpoint.read(name, rows=slice(first, first + rows))
        return got.numel() * got.element_size()

    def rate(readers: int):
        per_round = probe.per_round(0.5)

        def measure(scale: int) -> float:
            start = time.perf_counter()
            with ThreadPoolExecutor(readers) as pool:
                n = sum(pool.map(lambda i: read(i, readers, per_round * scale // readers), range(readers)))
            probe.spent += n
            elapsed = time.perf_counter() - start
            return n / max(elapsed - latency, elapsed / 2, 1e-6)
        return measure

    return latency, _median_until_stable(rate(1)), _median_until_stable(rate(workers))


def _element_seconds(config: MergeConfig, units: Sequence[Unit], checkpoints, device: str, workers: int,
                     allowance: float) -> tuple[float, float]:
    """(seconds per output element of the plain path, for 4 inputs (scaled by the inputs a unit
    has): the largest unit's method on random blocks of its dtypes, end to end; the speed of
    `workers` doing it at once against `workers` times one's, at most 1: what the device's
    cores give in parallel, the machine's other load included), all rounds within `allowance`
    elements."""
    units = [u for u in units if u.shape and not u.copied]
    if not units:
        return 0.0, 1.0
    unit = max(units, key=lambda u: math.prod(u.shape))
    dev = torch.device(device)
    compute = torch.float64 if config.dtype == "float64" else torch.float32
    stored = [DTYPES[checkpoints[s.checkpoint].tensors[s.tensor].dtype][0] for s in unit.inputs]
    method = config.method
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(CPU_INTRA_OP_THREADS)
    try:
        per_row = math.prod(unit.shape[1:])

        def measure(scale: int) -> float:
            rows = max(1, min(unit.shape[0], int(min(PROBE_ELEMENTS, allowance / (_SCALE_SUM + ROUNDS * workers)))
                              * scale // max(per_row, 1)))
            shape = (rows, *unit.shape[1:])
            elements = math.prod(shape)
            raw = [torch.randn(shape, device=dev).to(dtype) for dtype in stored]
            start = time.perf_counter()
            tensors = [r.to(compute) for r in raw]
            base = tensors[unit.base] if unit.base is not None else None
            taus = [t.sub_(base) if base is not None else t for i, t in enumerate(tensors) if i in unit.fine_tunes]
            where = Where(unit.name, lambda: torch.arange(elements, device=dev).view(shape), unit.base)
            merged = method.merge(taus if method.operates_on == "deltas" else tensors,
                                  unit.call_params(method), where, base)
            out = (merged if base is None else base + merged).to(DTYPES[unit.out_dtype][0])
            checksum(tensor_bytes(out))
            return (time.perf_counter() - start) / elements * 4 / max(len(unit.inputs), 1)

        one = _median_until_stable(measure)
        if workers == 1:
            return one, 1.0
        at_once = []
        with ThreadPoolExecutor(workers) as pool:
            for _ in range(ROUNDS):
                at_once.append(statistics.median(pool.map(lambda _: measure(1), range(workers))))
        # the first measure(1)'s size is the one the parallel rounds use
        return one, max(1 / workers, min(1.0, measure(1) / statistics.median(at_once)))
    finally:
        torch.set_num_threads(threads)


def _flop_rate(device: str, allowance: float) -> float:
    """float64 flop/s of one worker (on a CPU, one intra-op thread, as workers compute): n x n
    products, every round (a warm-up and a timed product, n doubled at most once) within
    `allowance` flops."""
    dev = torch.device(device)
    # 2 products of 2 n^3 flops a round, ROUNDS rounds at n and up to 2 * ROUNDS at 2n
    largest = int((allowance / (4 * ROUNDS * (1 + 8 * GROWTHS))) ** (1 / 3))
    size = max(16, min(2048 if dev.type == "cuda" else 768, largest))
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(CPU_INTRA_OP_THREADS)
    try:
        def measure(scale: int) -> float:
            n = size * min(scale, 2)
            a = torch.randn(n, n, dtype=torch.float64, device=dev)
            a @ a  # warm-up
            _sync(dev)
            start = time.perf_counter()
            a @ a
            _sync(dev)
            return 2.0 * n ** 3 / (time.perf_counter() - start)

        return _median_until_stable(measure)
    finally:
        torch.set_num_threads(threads)


def _eigh_seconds(n: int, device: str, allowance: float) -> float:
    """Seconds of a float64 eigh at size n (probed at min(n, 1024), scaled by n^3), the probe's
    rounds and its Gram within `allowance` (in n^3: the eighs the job does, summed)."""
    if n <= 0:
        return 0.0
    dev = torch.device(device)
    probe = max(1, min(n, 1024, int((allowance / (ROUNDS + 1)) ** (1 / 3))))
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(CPU_INTRA_OP_THREADS)
    try:
        a = torch.randn(probe, probe, dtype=torch.float64, device=dev)
        g = a @ a.T

        def measure(scale: int) -> float:
            _sync(dev)
            start = time.perf_counter()
            torch.linalg.eigh(g)
            _sync(dev)
            return time.perf_counter() - start

        return _median_until_stable(measure, growths=0) * (n / probe) ** 3
    finally:
        torch.set_num_threads(threads)


def _calibration_fixed_seconds(config: MergeConfig, units: Sequence[Unit], device: str) -> float:
    """What a calibrated unit costs beyond its flops and its eigh: the whole Gram path (pass 1,
    solve, summary, pass 2) on the smallest calibrated shape of `units` (at most 64 x 64),
    random data, median until stable. Dominates for models of many small matrices."""
    if not units:
        return 0.0
    unit = min(units, key=lambda u: math.prod(u.shape))
    shape = tuple(min(d, 64) for d in unit.shape)
    dev = torch.device(device)
    cal = config.calibration
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(CPU_INTRA_OP_THREADS)
    try:
        taus = [torch.randn(shape, device=dev) for _ in unit.fine_tunes]
        merged = sum(taus)

        def measure(scale: int) -> float:
            _sync(dev)
            start = time.perf_counter()
            for _ in range(scale):
                result = calibrate_gram(merged, taus, unit.alpha, cal.side, cal.target)
                result.summary()
            _sync(dev)
            return (time.perf_counter() - start) / scale

        return _median_until_stable(measure)
    finally:
        torch.set_num_threads(threads)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
