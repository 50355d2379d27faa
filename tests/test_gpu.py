"""The CUDA path against the float64 reference. Skipped, with the reason shown, where no GPU is
present (CI has none); run on a GPU machine with `python -m pytest tests/test_gpu.py -rs`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_svc import merge
from dist_svc.calibration import calibrate_gram
from dist_svc.executors import LocalExecutor
from tests.conftest import run_cli, write_config
from tests.reference import load_checkpoint, load_output, merge_reference, svc_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
F32_EPS = float(np.finfo(np.float32).eps)


@pytest.mark.parametrize("m, n, rank", [(300, 120, None), (120, 300, None), (256, 64, 5), (64, 256, 5)])
@pytest.mark.parametrize("side", ["column", "row"])
def test_gram_path_on_the_gpu_matches_the_float64_reference_to_1e_10(m, n, rank, side):
    rng = np.random.default_rng(m * n + (rank or 0))
    if rank:  # LoRA-style: rank-deficient, the null space must get eta = 1
        taus = [rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n)) for _ in range(3)]
    else:
        shared = rng.standard_normal((m, 4)) @ rng.standard_normal((4, n))
        taus = [shared + 0.1 * rng.standard_normal((m, n)) for _ in range(3)]
    wm = 0.3 * sum(taus)
    got = calibrate_gram(torch.from_numpy(wm).cuda(), [torch.from_numpy(t).cuda() for t in taus], 1 / 3, side,
                         block_rows=37)
    ref = svc_reference(wm, taus, 1 / 3, side)
    assert got.delta.is_cuda
    # float64 throughout (TF32 off): the same 1e-10 bound as on the CPU.
    assert np.linalg.norm(got.delta.cpu().numpy() - ref) / np.linalg.norm(ref) <= 1e-10


def test_a_merge_on_the_gpu_is_within_float32_error_of_the_reference_and_of_the_cpu(tmp_path, family):
    base, fts = family(3)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    # A fresh process with two worker threads: CUDA's linear algebra is initialised lazily, and
    # two threads reaching their first eigh at once used to fail there.
    run_cli("merge", cfg, tmp_path / "gpu", "--shard-size", "40KB", "--device", "cuda", "--threads", "2")
    merge(cfg, tmp_path / "cpu", shard_size="40KB", progress="off", executor=LocalExecutor(device="cpu"))
    gpu, cpu, ref = load_output(tmp_path / "gpu"), load_output(tmp_path / "cpu"), merge_reference(base, fts, [1.0] * 3)
    base_t = load_checkpoint(base)
    for name, tensor in gpu.items():
        delta = np.abs(ref[name] - base_t[name]).max()
        tol = 4 * 9 * F32_EPS * delta + np.spacing(np.abs(ref[name]).astype(np.float32))  # as test_merge
        assert (np.abs(tensor.numpy().astype(np.float64) - ref[name]) <= tol).all(), name
        assert (np.abs(tensor.numpy().astype(np.float64) - cpu[name].numpy()) <= 2 * tol).all(), name
