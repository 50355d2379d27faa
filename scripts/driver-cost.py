"""The driver's own cost per tensor of a `--cluster` merge: CPU seconds and bytes read and
written by the driver process, on a local Ray cluster (head + N nodes on 127.0.0.1).

Models: Qwen2-MoE-layout checkpoints with 256 tiny experts per layer (dist_svc.commands.demo's
TinyMoE, laid out as `dist-svc bench tensors` builds them: 2 layers: 1.5k tensors, 24: 18.6k,
61: 47k; random values, `random_family`), K = 3, bf16, task arithmetic, calibration off, 1 MB shards. The merge runs in this process
(`dist_svc.merge` with a `RayExecutor`), so the figures are this process's: CPU time
(`time.process_time`, every thread: planning, the queue, Ray's client threads, recording) and
/proc/self/io, taken around the merge call alone (imports and the cluster's start excluded).

    PYTHONPATH=$PWD python scripts/driver-cost.py --layers 2 24 61 --workdir /tmp/driver-cost
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway cluster on the loopback interface
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def proc_io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f.read().splitlines())}


def random_family(root: Path, arch, k: int) -> None:
    """Base (4 shards) and `k` fine-tunes (one file each) of `arch` in bf16, as `make_family`
    lays them out, with random values (the driver's cost does not depend on them; make_family's
    low-rank updates take most of an hour for 47k tensors on a busy 2-core VM)."""
    import torch

    from dist_svc.commands.demo import write_hf_checkpoint, write_tokenizer

    gen = torch.Generator().manual_seed(0)
    base = {name: 0.02 * torch.randn(shape, generator=gen) for name, shape in arch.shapes().items()}
    write_hf_checkpoint(root / "base", {n: t.bfloat16() for n, t in base.items()}, 4, arch.hf_config(torch.bfloat16))
    write_tokenizer(root / "base", arch.vocab_size)
    for i in range(k):
        ft = {n: (t + 1e-3 * torch.randn(t.shape, generator=gen)).bfloat16() for n, t in base.items()}
        write_hf_checkpoint(root / f"ft-{i + 1}", ft, 1, arch.hf_config(torch.bfloat16))


def measure(layers: int, workdir: Path, address: str, k: int = 3) -> dict:
    import torch

    from dist_svc import merge
    from dist_svc.commands.demo import TinyMoE, write_config
    from dist_svc.executors.ray_cluster import RayExecutor

    arch = TinyMoE(num_hidden_layers=layers, num_experts=256)
    root = workdir / f"moe-{layers}l-k{k}"
    if not (root / f"ft-{k}").is_dir():
        random_family(root, arch, k)
    config = write_config(root / "m.yaml", root / "base", [root / f"ft-{i + 1}" for i in range(k)], lam=0.3,
                          calibrate=False)
    out = root / f"out-cluster-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    io_before, cpu_before, wall_before = proc_io(), time.process_time(), time.perf_counter()
    report = merge(config, out, shard_size="1MB", progress="off", executor=RayExecutor(address=address),
                   model_card=False)
    cpu, wall, io_after = time.process_time() - cpu_before, time.perf_counter() - wall_before, proc_io()
    tensors = report.units_total
    return {"layers": layers, "tensors": tensors, "output_bytes": report.bytes_total,
            "driver_cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
            "driver_cpu_ms_per_tensor": round(1e3 * cpu / tensors, 3),
            **{f"driver_{key}": io_after[key] - io_before[key] for key in ("rchar", "wchar", "read_bytes", "write_bytes")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 24, 61])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/driver-cost"))
    parser.add_argument("--nodes", type=int, default=1, help="worker nodes beside the head (1 CPU each)")
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "num_gpus": 0, "object_store_memory": 80 * 2**20, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        for _ in range(args.nodes):
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="dist-svc", log_to_driver=False)
        for layers in args.layers:
            print(json.dumps(measure(layers, args.workdir.resolve(), cluster.address)), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
