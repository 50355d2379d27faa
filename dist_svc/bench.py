"""Benchmarks, measured in one run against a baseline measured in the same run.

`calibration`: the calibration kernel on Llama-3-70B matrix shapes (optionally scaled down),
K task vectors: the paper's approach (float32 `torch.linalg.svd` of Wm, default driver, plus
per-rank projections) and the same in float64 (the exact reference, and the cost of doing the
paper's approach at float64 accuracy) against dist-svc's float64 Gram path, each timed (median of
`repeats`); errors are relative Frobenius distances to the float64 full SVD.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch

from dist_svc.calibration import calibrate_gram, calibrate_singular_values

# (name, rows, cols) of Llama-3-70B's calibrated matrices
LLAMA3_70B_SHAPES = (
    ("q_proj / o_proj", 8192, 8192),
    ("k_proj / v_proj", 1024, 8192),
    ("gate_proj / up_proj", 28672, 8192),
    ("down_proj", 8192, 28672),
)


def _timed(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    times, result = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench_calibration(scale: int = 1, k: int = 3, repeats: int = 3, device: str = "cpu", seed: int = 0) -> list[dict]:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device=dev).manual_seed(seed)
    rows = []
    for name, m, n in LLAMA3_70B_SHAPES:
        m, n = m // scale, n // scale
        # Task vectors with a shared part (the case calibration is for) over a noise floor.
        shared = torch.randn(m, 16, generator=gen, device=dev) @ torch.randn(16, n, generator=gen, device=dev) / 4
        taus = [(shared + torch.randn(m, n, generator=gen, device=dev) * 0.1) * 1e-3 for _ in range(k)]
        wm = 0.3 * torch.stack(taus).sum(0)
        alpha = 1.0 / k
        kernels = {
            "svd64": lambda wm=wm, taus=taus: calibrate_singular_values(wm, taus, alpha, dtype=torch.float64).delta,
            "paper": lambda wm=wm, taus=taus: calibrate_singular_values(wm, taus, alpha, dtype=torch.float32).delta,
            "gram": lambda wm=wm, taus=taus: calibrate_gram(wm, taus, alpha).delta,
        }
        t_exact, reference = _timed(kernels["svd64"], dev, repeats)
        ref_norm = torch.linalg.norm(reference)
        t_paper, d_paper = _timed(kernels["paper"], dev, repeats)
        t_gram, d_gram = _timed(kernels["gram"], dev, repeats)
        rows.append({
            "matrix": name, "shape": f"{m}x{n}", "k": k,
            "paper_s": t_paper, "svd64_s": t_exact, "gram_s": t_gram, "speedup": t_paper / t_gram,
            "speedup_vs_svd64": t_exact / t_gram,
            "paper_err": float(torch.linalg.norm(d_paper.double() - reference) / ref_norm),
            "gram_err": float(torch.linalg.norm(d_gram.double() - reference) / ref_norm),
        })
        del kernels, taus, wm, reference, d_paper, d_gram
    return rows


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")
