"""`dist-svc merge --dry-run`: the plan in numbers, computed from metadata and two short probes.

Nothing is merged and nothing is written. Bytes and memory are exact consequences of the plan;
the time is an estimate: the inputs' read rate is probed by reading up to PROBE_BYTES of the
largest input tensor, the arithmetic rate by one float64 matrix product on the device, and each
unit costs the larger of its read time and its arithmetic (reads and compute overlap across the
workers' units).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from dist_svc.blocks import BLOCK_ELEMENTS
from dist_svc.config import MergeConfig
from dist_svc.plan import Plan
from dist_svc.storage.types import ITEMSIZE
from dist_svc.worker import CACHE_BYTES, CPU_INTRA_OP_THREADS

PROBE_BYTES = 256 << 20


@dataclass(frozen=True)
class Estimate:
    tensors: int
    calibrated: int
    read_bytes: int
    write_bytes: int
    worker_memory_bytes: int  # peak of one worker (one unit in flight)
    gram_flops: float
    read_rate: float  # bytes/s, probed
    flop_rate: float  # float64 flop/s, probed
    workers: int
    seconds: float


def estimate(config: MergeConfig, plan: Plan, base, models, device: str, workers: int) -> Estimate:
    checkpoints = [base, *models]
    compute_bytes = 8 if config.dtype == "float64" else 4
    read_bytes = sum(checkpoints[s.checkpoint].tensors[s.tensor].nbytes for u in plan.units for s in u.inputs)
    flops, memory = 0.0, 0
    per_unit_seconds = []
    read_rate, flop_rate = _read_rate(base, models), _flop_rate(device)
    for u in plan.units:
        k = len(u.fine_tunes)
        elements = math.prod(u.shape) if u.shape else 1
        unit_read = sum(checkpoints[s.checkpoint].tensors[s.tensor].nbytes for s in u.inputs)
        unit_flops = 0.0
        if u.needs == "element" or (u.needs == "row" and len(u.shape) > 1):
            mem = (len(u.inputs) + 1) * min(elements, BLOCK_ELEMENTS) * compute_bytes
        else:
            mem = (len(u.inputs) + 1) * elements * compute_bytes
        if u.calibrate:
            m, n = max(u.shape), min(u.shape)
            grams = k + 1 + (k if config.calibration.side == "row" and u.shape[0] >= u.shape[1]
                             or config.calibration.side == "column" and u.shape[0] < u.shape[1] else 0)
            unit_flops = 2.0 * m * n * n * (grams + 1) + 10.0 * n ** 3 + 2.0 * k * n ** 3
            mem += (grams + 2) * n * n * 8
            cache = 2 * elements * compute_bytes
            mem += cache if cache <= CACHE_BYTES else 0
        flops += unit_flops
        memory = max(memory, mem)
        per_unit_seconds.append(max(unit_read / read_rate, unit_flops / flop_rate))
    # Units run `workers` at a time, largest first; with many units the total divides evenly.
    seconds = max(sum(per_unit_seconds) / max(workers, 1), max(per_unit_seconds, default=0.0))
    return Estimate(len(plan.units), sum(u.calibrate for u in plan.units), read_bytes, plan.total_bytes, memory,
                    flops, read_rate, flop_rate, workers, seconds)


def _read_rate(base, models) -> float:
    """Bytes/s reading the largest tensor of the first fine-tune (up to PROBE_BYTES of its rows)."""
    ckpt = models[0] if models else base
    name, info = max(ckpt.tensors.items(), key=lambda kv: kv[1].nbytes)
    if not info.shape:
        return 1e9
    row_bytes = max(1, math.prod(info.shape[1:]) * ITEMSIZE[info.dtype])
    rows = max(1, min(info.shape[0], PROBE_BYTES // row_bytes))
    start = time.perf_counter()
    got = ckpt.read(name, rows=slice(0, rows))
    seconds = time.perf_counter() - start
    return max(got.numel() * got.element_size(), 1) / max(seconds, 1e-6)


def _flop_rate(device: str) -> float:
    """float64 flop/s of one worker (on a CPU, one intra-op thread, as workers compute)."""
    dev = torch.device(device)
    n = 2048 if dev.type == "cuda" else 512
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(CPU_INTRA_OP_THREADS)
    try:
        a = torch.randn(n, n, dtype=torch.float64, device=dev)
        a @ a  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        for _ in range(3):
            a @ a
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return 3 * 2.0 * n ** 3 / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
