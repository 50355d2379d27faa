"""Benchmarks, measured in one run against a baseline measured in the same run (dist-svc against
mergekit: dist_svc.bench.merge).

`calibration`: the calibration kernel on Llama-3-70B matrix shapes (optionally scaled down),
K task vectors: the paper's approach (float32 `torch.linalg.svd` of Wm, default driver, plus
per-rank projections) and the same in float64 (the exact reference, and the cost of doing the
paper's approach at float64 accuracy) against dist-svc's float64 Gram path, each timed (median of
`repeats`; the float64 SVD, the reference, is timed once); errors are relative Frobenius distances to the float64 full SVD.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from typing import Callable, Sequence

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
        t_exact, reference = _timed(kernels["svd64"], dev, 1)  # the reference: slow, timed once
        ref_norm = torch.linalg.norm(reference)
        t_paper, d_paper = _timed(kernels["paper"], dev, repeats)
        t_gram, d_gram = _timed(kernels["gram"], dev, repeats)
        path = calibrate_gram(wm, taus, alpha).path
        rows.append({
            "matrix": name, "shape": f"{m}x{n}", "k": k,
            "paper_s": t_paper, "svd64_s": t_exact, "gram_s": t_gram, "speedup": t_paper / t_gram,
            "speedup_vs_svd64": t_exact / t_gram, "gram_path": path,
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


def drop_page_cache() -> bool:
    """Empty the kernel's page cache so that the next reads come from storage (root only)."""
    import os

    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def read_bandwidth(files, threads: int = 8, chunk: int = 64 << 20) -> tuple[int, float]:
    """(bytes, seconds) to read `files` whole with `threads` parallel positional reads of
    `chunk` bytes: what the storage delivers to a reader that does nothing else."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    jobs = []
    for f in files:
        size = os.path.getsize(f)
        jobs += [(f, off, min(chunk, size - off)) for off in range(0, size, chunk)]
    local = __import__("threading").local()

    def read(job) -> int:
        path, off, n = job
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = bytearray(chunk)
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.preadv(fd, [memoryview(buf)[:n]], off)
        finally:
            os.close(fd)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read, jobs))
    return total, time.perf_counter() - start


def bench_throughput(workdir, layers: int = 4, hidden: int = 4096, intermediate: int = 14336, k: int = 3,
                     device: str | None = None, threads: int | None = None, calibrate: bool = True,
                     repeats: int = 3, out_dir=None, log=print) -> dict:
    """End to end: the merge's input bytes per second against the storage's own read bandwidth,
    measured in the same run on the same files, with the page cache emptied before each (when
    this process may; else both are page-cache reads, and the result says so)."""
    import shutil
    from pathlib import Path

    from dist_svc.commands.demo import TinyLlama, make_family, write_config
    from dist_svc.driver import merge
    from dist_svc.executors import LocalExecutor

    workdir = Path(workdir).resolve()
    arch = TinyLlama(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate,
                     num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 512)
    root = workdir / f"llama-h{hidden}-{layers}l-k{k}"
    if not (root / "ft-1").is_dir():
        log(f"generating {root} ...")
        make_family(root, k=k, arch=arch, dtype=torch.bfloat16, shards=4)
    fts = [root / f"ft-{i + 1}" for i in range(k)]
    config = write_config(root / "merge.yaml", root / "base", fts, lam=0.3, calibrate=calibrate)
    files = sorted(str(p) for d in [root / "base", *fts] for p in d.glob("*.safetensors"))
    executor = LocalExecutor(device=device, threads=threads)
    cold = drop_page_cache()
    reads, merges, stages = [], [], []
    for rep in range(repeats):
        drop_page_cache()
        nbytes, seconds = read_bandwidth(files)
        reads.append(nbytes / seconds)
        out = Path(out_dir).resolve() if out_dir else root / "out"
        shutil.rmtree(out, ignore_errors=True)
        drop_page_cache()
        start = time.perf_counter()
        report = merge(config, out, executor=executor, progress="off", log=lambda *_: None)
        merges.append(nbytes / (time.perf_counter() - start))
        stages.append(report.stages)
        log(f"round {rep + 1}: storage {reads[-1] / 1e9:.2f} GB/s, merge {merges[-1] / 1e9:.2f} GB/s of input")
    read_bw, merge_bw = statistics.median(reads), statistics.median(merges)
    # Where the workers' time went (summed over workers, median over rounds), and the stage
    # that took most of it: what limits the merge.
    stage_seconds = {k: statistics.median(s.get(k, 0.0) for s in stages) for k in stages[-1]}
    return {"params": sum(math.prod(s) for s in arch.shapes().values()), "k": k, "input_bytes": nbytes,
            "cold_cache": cold, "device": executor.device, "threads": executor.threads, "calibrate": calibrate,
            "storage_read_gbps": read_bw / 1e9, "merge_input_gbps": merge_bw / 1e9, "ratio": merge_bw / read_bw,
            "stage_seconds": stage_seconds, "limited_by": max(stage_seconds, key=stage_seconds.get) if stage_seconds else None,
            "machine": machine_description(executor.device)}


def bench_lora(scale: int = 8, k: int = 3, rank: int = 16, repeats: int = 3, seed: int = 0) -> list[dict]:
    """SVC of a merge of K LoRA task vectors (rank `rank` each) on Llama-3-70B's shapes divided
    by `scale`: the dense float64 Gram path on the m x n task vectors (what a merge of dense
    checkpoints computes) against the factored path (dist_svc.lowrank: QRs of the stacked
    factors and an SVC of the sum(r) x sum(r) core), with the factored result's distance from
    the dense one."""
    from dist_svc.lowrank import Factored, merge_factored

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for name, m, n in LLAMA3_70B_SHAPES:
        m, n = m // scale, n // scale
        shared = torch.randn(m, rank // 2, generator=gen, dtype=torch.float64)
        taus = [Factored(torch.cat([shared, torch.randn(m, rank - rank // 2, generator=gen, dtype=torch.float64)], 1)
                         * 1e-2, torch.randn(n, rank, generator=gen, dtype=torch.float64) * 1e-2) for _ in range(k)]
        coefficients = [0.3] * k
        alpha = 1.0 / k

        def dense():
            full = [t.dense() for t in taus]
            return calibrate_gram(sum(c * t for c, t in zip(coefficients, full)), full, alpha).delta

        t_dense, d_dense = _timed(dense, torch.device("cpu"), repeats)
        t_factored, result = _timed(lambda: merge_factored(taus, coefficients, True, alpha)[0], torch.device("cpu"),
                                    repeats)
        error = float(torch.linalg.norm(result.dense() - d_dense) / torch.linalg.norm(d_dense))
        rows.append({"matrix": name, "shape": f"{m}x{n}", "k": k, "rank": rank, "dense_s": t_dense,
                     "factored_s": t_factored, "speedup": t_dense / t_factored, "difference": error})
    return rows


def bench_read(workdir, hidden: int = 4096, layers: int = 2, repeats: int = 3, log=print,
               remote: str | None = None) -> list[dict]:
    """Read rate of one checkpoint stored three ways (safetensors, zarr, zarr + zstd), read as a
    worker reads it: every tensor in row blocks of 8M elements, one thread, into torch tensors.
    Page cache emptied before each read when this process may (else "warm" only). With
    `remote` (a URL such as s3://bucket/prefix; endpoint and credentials from the environment),
    the same stores are uploaded there once and read back from it too."""
    import shutil
    from pathlib import Path

    from dist_svc.commands.convert import convert
    from dist_svc.commands.demo import TinyLlama, make_family
    from dist_svc.storage import open_checkpoint

    workdir = Path(workdir).resolve()
    arch = TinyLlama(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 7 // 2,
                     num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 512)
    root = workdir / f"read-h{hidden}-{layers}l"
    if not (root / "ft-1").is_dir():
        log(f"generating {root} ...")
        shutil.rmtree(root, ignore_errors=True)
        make_family(root, k=1, arch=arch, dtype=torch.bfloat16, shards=2)
    stores = {"safetensors": root / "ft-1", "zarr": root / "ft-1.zarr", "zarr+zstd": root / "ft-1-zstd.zarr"}
    for label, compression in (("zarr", "none"), ("zarr+zstd", "zstd")):
        if not stores[label].exists():
            convert(stores["safetensors"], stores[label], compression=compression, progress="off")

    def read_all(path) -> int:
        ckpt = open_checkpoint(path)
        total = 0
        for name, info in ckpt.tensors.items():
            rows = info.shape[0] if info.shape else 1
            step = max(1, (1 << 23) // max(1, math.prod(info.shape[1:])))
            for r0 in range(0, rows, step):
                total += ckpt.read(name, rows=slice(r0, r0 + step) if info.shape else None).numel()
        ckpt.close()
        return total

    rows = []
    nbytes = sum(p.stat().st_size for p in stores["safetensors"].glob("*.safetensors"))
    if remote:
        for label, path in list(stores.items()):
            url = f"{remote.rstrip('/')}/{root.name}/{Path(path).name}"
            _upload_once(Path(path), url, log)
            stores[f"{label} remote"] = url
    for label, path in stores.items():
        if isinstance(path, str):  # remote: no page cache of ours to empty, and none to warm
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                read_all(path)
                times.append(time.perf_counter() - start)
            t = statistics.median(times)
            rows.append({"format": label, "cache": "-", "seconds": t, "gbps": nbytes / t / 1e9,
                         "bytes_on_disk": sum(p.stat().st_size for p in stores[label.removesuffix(" remote")].rglob("*")
                                              if p.is_file()), "tensor_bytes": nbytes})
            log(f"{label}: {nbytes / t / 1e9:.2f} GB/s")
            continue
        on_disk = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
        for cache in ("cold", "warm"):
            times = []
            for _ in range(repeats):
                if cache == "cold" and not drop_page_cache():
                    break
                if cache == "warm":
                    read_all(path)
                start = time.perf_counter()
                read_all(path)
                times.append(time.perf_counter() - start)
            if times:
                t = statistics.median(times)
                rows.append({"format": label, "cache": cache, "seconds": t, "gbps": nbytes / t / 1e9,
                             "bytes_on_disk": on_disk, "tensor_bytes": nbytes})
                log(f"{label} {cache}: {nbytes / t / 1e9:.2f} GB/s")
    return rows


# -- scale: tensors, frontier shapes, estimates, cores ------------------------------------------------

def bench_tensors(workdir, layers: Sequence[int] = (2, 24, 61), k: int = 3, repeats: int = 3,
                  mergekit: str | None = None, log=print) -> list[dict]:
    """Cost per tensor as the tensor count grows: Qwen2-MoE-layout models with 256 tiny experts
    per layer (2 layers: 1.5k tensors, 24: 18.6k, 61: 47k, DeepSeek-V3's count), merged with
    task arithmetic into 1 MB shards, calibration off and on; then a no-op rerun and `status`
    of the finished merge. Medians of `repeats`; mergekit on the same YAML when given."""
    import shutil
    import sys
    from pathlib import Path

    from dist_svc.bench.merge import bench_config, measure
    from dist_svc.commands.demo import TinyMoE, make_family, write_config

    workdir = Path(workdir).resolve()
    rows = []
    for n_layers in layers:
        arch = TinyMoE(num_hidden_layers=n_layers, num_experts=256)
        root = workdir / f"moe-{n_layers}l-k{k}"
        if not (root / f"ft-{k}").is_dir():
            log(f"generating {root} ...")
            make_family(root, k=k, arch=arch, dtype=torch.bfloat16, shards=4)
        fts = [root / f"ft-{i + 1}" for i in range(k)]
        row = {"layers": n_layers, "tensors": len(arch.shapes())}
        for calibrate in (False, True):
            config = write_config(root / f"m-{calibrate}.yaml", root / "base", fts, lam=0.3, calibrate=calibrate)
            out = root / "out"
            times = []
            for _ in range(repeats):
                shutil.rmtree(out, ignore_errors=True)
                times.append(measure([sys.executable, "-m", "dist_svc.cli", "merge", str(config), str(out),
                                      "--shard-size", "1MB", "--progress", "off"]))
            label = "svc" if calibrate else "plain"
            row[f"{label}_s"] = statistics.median(t["wall_s"] for t in times)
            row[f"{label}_ms_per_tensor"] = 1e3 * row[f"{label}_s"] / row["tensors"]
            row[f"{label}_peak_mib"] = statistics.median(t["peak_rss_bytes"] for t in times) / 2**20
            log(f"{row['tensors']} tensors, calibration {'on' if calibrate else 'off'}: {row[f'{label}_s']:.1f} s")
            if not calibrate:
                row["noop_rerun_s"] = statistics.median(
                    measure([sys.executable, "-m", "dist_svc.cli", "merge", str(config), str(out), "--shard-size",
                             "1MB", "--progress", "off"])["wall_s"] for _ in range(repeats))
                row["status_s"] = statistics.median(
                    measure([sys.executable, "-m", "dist_svc.cli", "status", str(out)])["wall_s"] for _ in range(repeats))
        if mergekit:
            config = bench_config(root, "task_arithmetic", k, "bfloat16")
            out = root / "out-mergekit"
            shutil.rmtree(out, ignore_errors=True)
            result = measure([mergekit, str(config), str(out), "--quiet"])
            row["mergekit_s"] = result["wall_s"]
            row["mergekit_ms_per_tensor"] = 1e3 * result["wall_s"] / row["tensors"]
        rows.append(row)
    return rows


def frontier_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of Llama-3.1-405B ("llama-405b") or DeepSeek-V3 ("deepseek-v3":
    MLA attention, 3 dense layers then 58 MoE layers of 256 routed experts and a shared one)."""
    out: dict[str, tuple[int, ...]] = {}
    if name == "llama-405b":
        h, i, layers, vocab, kv = 16384, 53248, 126, 128256, 1024
        out["model.embed_tokens.weight"] = (vocab, h)
        for n in range(layers):
            p = f"model.layers.{n}."
            out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                        p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                        p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                        p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                        p + "post_attention_layernorm.weight": (h,)})
        out["model.norm.weight"] = (h,)
        out["lm_head.weight"] = (vocab, h)
        return out
    if name == "deepseek-v3":
        h, vocab, layers, experts, moe_i, dense_i = 7168, 129280, 61, 256, 2048, 18432
        out["model.embed_tokens.weight"] = (vocab, h)
        for n in range(layers):
            p = f"model.layers.{n}."
            out.update({p + "self_attn.q_a_proj.weight": (1536, h), p + "self_attn.q_a_layernorm.weight": (1536,),
                        p + "self_attn.q_b_proj.weight": (24576, 1536),
                        p + "self_attn.kv_a_proj_with_mqa.weight": (576, h),
                        p + "self_attn.kv_a_layernorm.weight": (512,), p + "self_attn.kv_b_proj.weight": (32768, 512),
                        p + "self_attn.o_proj.weight": (h, 16384), p + "input_layernorm.weight": (h,),
                        p + "post_attention_layernorm.weight": (h,)})
            mlps = [p + "mlp."] if n < 3 else [p + "mlp.shared_experts."] + [f"{p}mlp.experts.{e}." for e in range(experts)]
            width = dense_i if n < 3 else moe_i
            for q in mlps:
                out.update({q + "gate_proj.weight": (width, h), q + "up_proj.weight": (width, h),
                            q + "down_proj.weight": (h, width)})
            if n >= 3:
                out[p + "mlp.gate.weight"] = (experts, h)
        out["model.norm.weight"] = (h,)
        out["lm_head.weight"] = (vocab, h)
        return out
    raise ValueError(f"unknown model {name!r}")


def write_sparse_checkpoint(path, shapes: dict[str, tuple[int, ...]], dtype: str = "BF16",
                            shard_bytes: int = 5 * 10**9) -> None:
    """A Hugging Face checkpoint whose headers are real and whose data is a hole in a sparse
    file: planning, the dry run and memory figures see the real model; nothing is stored."""
    import json
    from pathlib import Path

    from dist_svc.storage.output import layout_for
    from dist_svc.storage.types import INDEX_NAME

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards = layout_for("safetensors", path, [(n, dtype, s) for n, s in shapes.items()],
                        {"shard_bytes": shard_bytes}).shards
    weight_map = {}
    for shard in shards:
        with open(path / shard.file, "wb") as f:
            f.write(shard.header)
            f.truncate(shard.size)
        weight_map.update({n: shard.file for n in shard.tensors})
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"architectures": ["Frontier"], "model_type": "frontier"}))


def bench_frontier(workdir, models: Sequence[str] = ("llama-405b", "deepseek-v3"), k: int = 3,
                   log=print) -> list[dict]:
    """The dry run of a K-way merge of frontier-size models whose files are headers over holes:
    tensors, bytes, the largest unit's memory against this machine, and the time, calibration
    on and off."""
    import sys
    from pathlib import Path

    import yaml

    workdir = Path(workdir).resolve()
    rows = []
    for name in models:
        root = workdir / name
        shapes = frontier_shapes(name)
        if not (root / f"ft-{k}" / "config.json").is_file():
            log(f"writing {name}'s headers ({len(shapes)} tensors) x {k + 1} under {root} ...")
            for d in ["base"] + [f"ft-{i + 1}" for i in range(k)]:
                write_sparse_checkpoint(root / d, shapes)
        for calibrate in (True, False):
            config = root / f"m-{calibrate}.yaml"
            config.write_text(yaml.safe_dump({
                "merge_method": "task_arithmetic", "base_model": str(root / "base"),
                "models": [{"model": str(root / f"ft-{i + 1}")} for i in range(k)],
                "parameters": {"lambda": 0.3}, "calibrate": calibrate}, sort_keys=False))
            start = time.perf_counter()
            proc = __import__("subprocess").run([sys.executable, "-m", "dist_svc.cli", "merge", str(config),
                                                 str(root / "out"), "--dry-run"], capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(proc.stderr)
            rows.append({"model": name, "calibrate": calibrate, "tensors": len(shapes),
                         "seconds_to_plan": time.perf_counter() - start, "report": proc.stdout})
            log(proc.stdout)
    return rows


def bench_estimate(workdir, cases: Sequence[str] = ("dense", "moe"), repeats: int = 1, log=print) -> list[dict]:
    """The dry run's estimate against the merge's measured time on this machine, calibration off
    and on, for a dense model (~290M parameters) and a MoE (1.5k tiny tensors), and how long
    the dry run itself took."""
    import shutil
    from pathlib import Path

    from dist_svc.commands.demo import TinyLlama, TinyMoE, make_family, write_config
    from dist_svc.driver import dry_run, merge

    workdir = Path(workdir).resolve()
    archs = {"dense": TinyLlama(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=20,
                                num_attention_heads=16, num_key_value_heads=4),
             "moe": TinyMoE(num_hidden_layers=2, num_experts=256)}
    rows = []
    for case in cases:
        root = workdir / f"estimate-{case}"
        if not (root / "ft-3").is_dir():
            log(f"generating {root} ...")
            make_family(root, k=3, arch=archs[case], dtype=torch.bfloat16, shards=2)
        fts = [root / f"ft-{i + 1}" for i in range(3)]
        for calibrate in (False, True):
            config = write_config(root / f"m-{calibrate}.yaml", root / "base", fts, lam=0.3, calibrate=calibrate)
            out = root / f"out-{calibrate}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            _, est, _ = dry_run(config, out)
            dry_s = time.perf_counter() - start
            times = []
            for _ in range(repeats):
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                merge(config, out, progress="off")
                times.append(time.perf_counter() - start)
            measured = statistics.median(times)
            rows.append({"case": case, "calibrate": calibrate, "estimated_s": est.seconds, "measured_s": measured,
                         "ratio": est.seconds / measured, "dry_run_s": dry_s})
            log(f"{case}, calibration {'on' if calibrate else 'off'}: estimated {est.seconds:.1f} s, "
                f"measured {measured:.1f} s ({est.seconds / measured:.2f}x)")
    return rows


def bench_scaling(workdir, threads: Sequence[int] | None = None, repeats: int = 3, log=print) -> list[dict]:
    """Speed-up from one worker to every core on a dense model (~290M parameters, calibrated),
    and whether every worker count wrote the same bytes."""
    import hashlib
    import os
    import shutil
    from pathlib import Path

    from dist_svc.commands.demo import TinyLlama, make_family, write_config
    from dist_svc.driver import merge
    from dist_svc.executors import LocalExecutor

    workdir = Path(workdir).resolve()
    root = workdir / "estimate-dense"
    if not (root / "ft-3").is_dir():
        make_family(root, k=3, arch=TinyLlama(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                              num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=4),
                    dtype=torch.bfloat16, shards=2)
    config = write_config(root / "m-True.yaml", root / "base", [root / f"ft-{i + 1}" for i in range(3)], lam=0.3)
    threads = threads or sorted({1, os.cpu_count() or 1})
    rows, digests = [], set()
    for n in threads:
        out = root / f"out-{n}"
        times = []
        for _ in range(repeats):
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            merge(config, out, progress="off", executor=LocalExecutor(device="cpu", threads=n))
            times.append(time.perf_counter() - start)
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(out.glob("*.safetensors")))).hexdigest()
        digests.add(digest)
        rows.append({"threads": n, "seconds": statistics.median(times)})
        log(f"{n} worker(s): {rows[-1]['seconds']:.1f} s")
    for row in rows:
        row["speedup"] = rows[0]["seconds"] / row["seconds"]
        row["same_bytes"] = len(digests) == 1
    return rows


def _upload_once(local, url: str, log) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(f"{root}/.complete"):
        return
    log(f"uploading {local} to {url} ...")
    for f in sorted(local.rglob("*")):
        if f.is_file():
            fs.put_file(str(f), f"{root}/{f.relative_to(local).as_posix()}")
    fs.pipe_file(f"{root}/.complete", b"")
