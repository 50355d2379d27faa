"""`dist-svc merge --dry-run`: the plan in numbers, from metadata and probes of this machine.

Nothing is merged and nothing is written. Bytes and memory are exact consequences of the plan
(memory: dist_svc.memory's footprints, the largest and whether it fits). The time is a model
with measured rates, each probed several times (the median counts, and a probe is repeated
at a larger size while its rounds disagree by more than 20%):

- reading: the inputs' largest tensors read as workers read them, by one worker and by all of
  them at once (what the storage gives in parallel);
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
  before the first unit starts (timed here);
- writing: at the probed read rate (the output is a quarter of the input for K = 3).

A worker does its unit's reads, then its arithmetic; W workers overlap each other. The time is
the largest of: the workers' summed time divided by W, all bytes at the storage's parallel
rate, and the longest single unit; plus the driver's per-unit records and the plan.
"""

from __future__ import annotations

import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from dist_svc.calibration import calibrate_gram, oriented
from dist_svc.config import MergeConfig
from dist_svc.memory import Footprint, compute_bytes, unit_footprint
from dist_svc.methods import Where
from dist_svc.plan import Plan, Unit, build_plan
from dist_svc.storage.checksum import checksum
from dist_svc.storage.types import DTYPES, tensor_bytes
from dist_svc.worker import CPU_INTRA_OP_THREADS

PROBE_BYTES = 256 << 20  # read per round, at most
PROBE_ELEMENTS = 1 << 22  # elements of a probe block
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
    flop_rate: float  # float64 flop/s of one worker, probed
    element_seconds: float  # the plain path, per element, probed
    workers: int
    seconds: float
    gpu_seconds: dict  # "N x 8 GPUs" -> seconds, projected from H100 figures

    @property
    def worker_memory_bytes(self) -> int:
        return max(self.largest[1].host, self.largest[1].device)


def estimate(config: MergeConfig, plan: Plan, base, models, device: str, workers: int) -> Estimate:
    checkpoints = [base, *models]
    workers = max(1, workers)
    on_gpu = device.startswith("cuda")
    read_one, read_all = _read_rates(checkpoints, workers)
    flop_rate = _flop_rate(device)
    element_seconds = _element_seconds(config, plan, checkpoints, device)
    largest_n = max((min(u.shape) for u in plan.units if u.calibrate), default=0)
    eigh_seconds = _eigh_seconds(largest_n, device)
    calibrated_fixed = _calibration_fixed_seconds(config, plan, device)
    start = time.perf_counter()
    build_plan(config, base, models)  # the merge plans again: its start-up
    plan_seconds = time.perf_counter() - start

    total_read, total_cpu, longest, flops, gpu_cal = 0, 0.0, 0.0, 0.0, 0.0
    largest = ("", Footprint(0, 0))
    for u in plan.units:
        unit_read = sum(checkpoints[s.checkpoint].tensors[s.tensor].nbytes for s in u.inputs)
        elements = math.prod(u.shape) if u.shape else 1
        cpu = 0.0 if u.copied else elements * element_seconds * max(len(u.inputs), 1) / 4
        reread = 0
        if u.calibrate:
            unit_flops = _calibration_flops(u, config)
            n = min(u.shape)
            cpu += CALIBRATED_UNIT_OVERHEAD_S + calibrated_fixed + unit_flops / flop_rate + eigh_seconds * (n / largest_n) ** 3
            if 2 * elements * compute_bytes(config) > (2 << 30):
                reread = unit_read  # pass 2 reads the inputs again
            flops += unit_flops
            gpu_cal += H100_CALIBRATION_S_8192 * (max(u.shape) * n * n) / 8192 ** 3
        read_s = (unit_read + reread + u.nbytes) / read_one
        total_read += unit_read + reread + u.nbytes
        total_cpu += read_s + cpu
        longest = max(longest, read_s + cpu)
        fp = unit_footprint(u, config, on_gpu)
        if max(fp.host, fp.device) > max(largest[1].host, largest[1].device):
            largest = (u.name, fp)
    # Workers in parallel, bounded by the storage and by the longest unit; the driver records
    # every unit in its own thread (serial), and plans once before any unit starts.
    seconds = (max(total_cpu / workers, total_read / read_all, longest) + len(plan.units) * UNIT_OVERHEAD_S
               + plan_seconds)
    gpu_seconds = {f"{nodes} x 8 GPUs": max(total_read / (H100_READ_RATE * nodes), gpu_cal / (8 * nodes))
                   for nodes in (1, 4)}
    read_bytes = sum(checkpoints[s.checkpoint].tensors[s.tensor].nbytes for u in plan.units for s in u.inputs)
    return Estimate(len(plan.units), sum(u.calibrate for u in plan.units), read_bytes, plan.total_bytes, largest,
                    flops, read_one, read_all, flop_rate, element_seconds, workers, seconds, gpu_seconds)


def _calibration_flops(u: Unit, config: MergeConfig) -> float:
    m, n = max(u.shape), min(u.shape)
    f = len(u.fine_tunes)
    _, side = oriented(u.shape, config.calibration.side)
    grams = f + 1 + (f if side == "row" else 0)
    return 2.0 * m * n * n * (grams + 1)  # the Grams, then Wm P in pass 2


def _median_until_stable(measure, rounds: int = 3, growths: int = 2) -> float:
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


def _read_rates(checkpoints, workers: int) -> tuple[float, float]:
    """(bytes/s of one reader, bytes/s of `workers` readers at once), reading row blocks of the
    fine-tunes' largest tensors (each reader its own range of rows) as workers read them."""
    targets = sorted(((c, name, info) for c in checkpoints[1:] or checkpoints for name, info in c.tensors.items()
                      if info.shape and info.nbytes), key=lambda t: -t[2].nbytes)[:workers]
    if not targets:
        return 1e9, 1e9

    def read(i: int, readers: int, budget: int) -> int:
        checkpoint, name, info = targets[i % len(targets)]
        share = max(1, info.shape[0] // max(1, readers // len(targets) + 1))
        first = (i // len(targets)) * share
        rows = max(1, min(share, budget // max(1, info.nbytes // info.shape[0])))
        got = checkpoint.read(name, rows=slice(first, first + rows))
        return got.numel() * got.element_size()

    def rate(readers: int):
        def measure(scale: int) -> float:
            start = time.perf_counter()
            with ThreadPoolExecutor(readers) as pool:
                n = sum(pool.map(lambda i: read(i, readers, PROBE_BYTES * scale // (4 * readers)), range(readers)))
            return n / max(time.perf_counter() - start, 1e-6)
        return measure

    return _median_until_stable(rate(1)), _median_until_stable(rate(workers))


def _element_seconds(config: MergeConfig, plan: Plan, checkpoints, device: str) -> float:
    """Seconds per output element of the plain path (for 4 inputs; scaled by the inputs a unit
    has): the largest unit's method on random blocks of its dtypes, end to end."""
    units = [u for u in plan.units if u.shape and not u.copied]
    if not units:
        return 0.0
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
            rows = max(1, min(unit.shape[0], PROBE_ELEMENTS * scale // max(per_row, 1)))
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

        return _median_until_stable(measure)
    finally:
        torch.set_num_threads(threads)


def _flop_rate(device: str) -> float:
    """float64 flop/s of one worker (on a CPU, one intra-op thread, as workers compute)."""
    dev = torch.device(device)
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(CPU_INTRA_OP_THREADS)
    try:
        def measure(scale: int) -> float:
            n = (2048 if dev.type == "cuda" else 768) * min(scale, 2)
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


def _eigh_seconds(n: int, device: str) -> float:
    """Seconds of a float64 eigh at size n (probed at min(n, 1024), scaled by n^3)."""
    if n <= 0:
        return 0.0
    dev = torch.device(device)
    probe = min(n, 1024)
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


def _calibration_fixed_seconds(config: MergeConfig, plan: Plan, device: str) -> float:
    """What a calibrated unit costs beyond its flops and its eigh: the whole Gram path (pass 1,
    solve, summary, pass 2) on the smallest calibrated shape of the plan (at most 64 x 64),
    random data, median until stable. Dominates for models of many small matrices."""
    units = [u for u in plan.units if u.calibrate]
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
