"""`dist-svc bench`: benchmarks, each measured in one run against a baseline measured in the same
run. The commands are here; what they run is in `merge` (dist-svc against mergekit on the same
YAML) and `suites` (the calibration kernel, throughput, reads, scale, estimates, LoRA)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dist_svc.errors import DistSvcError
from dist_svc.progress import human_bytes, say

# name: (hidden, MLP, vocabulary) of the generated Llama-layout models
SHAPES = {"llama-1024": (1024, 2816, 32000), "llama-2048": (2048, 5632, 32000)}


def _say(line: str) -> None:
    say(line)  # above the progress bar while one is drawn


@click.group()
def bench() -> None:
    """Benchmarks: timings are medians, against a baseline measured in the same run."""


@bench.command("calibration")
@click.option("--scale", default=1, show_default=True,
              help="Divide each Llama-3-70B dimension by this (8 on a CPU: 1024x1024, 3584x1024, ...).")
@click.option("-k", "--models", "k", default=3, show_default=True, help="Number of task vectors.")
@click.option("--repeats", default=3, show_default=True, help="Timed runs per kernel (the median is shown).")
@click.option("--device", default="auto", show_default=True,
              help="cpu, cuda, cuda:1, ... ('auto': cuda when available).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the rows, with the machine, to this JSON file.")
def bench_calibration_cmd(scale: int, k: int, repeats: int, device: str, json_path: Path | None) -> None:
    """Time the calibration kernel on Llama-3-70B shapes: the paper's approach (float32 full SVD)
    against the float64 Gram path, with each one's error against a float64 full SVD.

    \b
    Example:
      dist-svc bench calibration --scale 8          # CPU, 1/8 scale
      dist-svc bench calibration --device cuda      # one GPU, full size
    """
    import torch

    from dist_svc.bench.suites import bench_calibration, machine_description

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    click.echo(f"calibration kernel, K={k}, scale 1/{scale}, median of {repeats}, on {machine_description(device)}")
    click.echo(f"{'matrix':<22}{'shape':>13}{'paper f32 (s)':>15}{'svd f64 (s)':>13}{'gram (s)':>10}"
               f"{'vs paper':>10}{'vs f64':>8}{'paper err':>11}{'gram err':>10}")
    rows = bench_calibration(scale=scale, k=k, repeats=repeats, device=device)
    for row in rows:
        click.echo(f"{row['matrix']:<22}{row['shape']:>13}{row['paper_s']:>15.3f}{row['svd64_s']:>13.3f}"
                   f"{row['gram_s']:>10.3f}{row['speedup']:>9.1f}x{row['speedup_vs_svd64']:>7.1f}x"
                   f"{row['paper_err']:>11.1e}{row['gram_err']:>10.1e}")
    if json_path:
        json_path.write_text(json.dumps({"machine": machine_description(device), "k": k, "scale": scale,
                                         "repeats": repeats, "rows": rows}, indent=1))


@bench.command("merge")
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-out"))
@click.option("--method", default="task_arithmetic", show_default=True,
              help="The merge method both tools run: any of `dist-svc`'s methods, with the settings of "
                   "dist_svc/bench/merge.py's METHOD_SETTINGS (TIES at density 0.5, SLERP at t 0.5, ...).")
@click.option("--layers", default="10,20,40", show_default=True,
              help="Model sizes to run, as decoder layer counts (20 layers of the default shape: ~291M parameters).")
@click.option("--shape", type=click.Choice(sorted(SHAPES)), default="llama-1024", show_default=True,
              help="Matrix sizes: " + "; ".join(f"{k}: hidden {h}, MLP {i}, vocabulary {v}"
                                                for k, (h, i, v) in sorted(SHAPES.items())) + ".")
@click.option("--hidden", type=int, default=None, help="Hidden size (overrides --shape's).")
@click.option("--intermediate", type=int, default=None, help="MLP size (overrides --shape's).")
@click.option("--vocab", type=int, default=None, help="Vocabulary size (overrides --shape's).")
@click.option("--dtype", "in_dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="dtype of the generated inputs.")
@click.option("--out-dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="out_dtype of the merge (computed in float32 by both tools).")
@click.option("-k", "--models", "k", default=3, show_default=True, help="Number of fine-tunes.")
@click.option("--repeats", default=3, show_default=True, help="Measured runs per tool (the median is shown).")
@click.option("--mergekit", default="mergekit-yaml", show_default=True,
              help="mergekit's command to compare with; 'none' to run dist-svc alone.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the rows, with the machine, to this JSON file.")
def bench_merge_cmd(workdir: Path, method: str, layers: str, shape: str, hidden: int | None,
                    intermediate: int | None, vocab: int | None, in_dtype: str, out_dtype: str, k: int,
                    repeats: int, mergekit: str, json_path: Path | None) -> None:
    """Wall time and peak memory (of the whole process tree) of dist-svc against mergekit on the
    same mergekit YAML and inputs (calibration off), the tools interleaved, and how far their
    outputs agree, for several model sizes generated in WORKDIR.

    \b
    Example:
      pip install mergekit==0.1.5   # in another environment; pass its mergekit-yaml
      dist-svc bench merge ./bench-out --mergekit /path/to/venv/bin/mergekit-yaml
      dist-svc bench merge ./bench-out --method ties --layers 4 --shape llama-2048 --dtype float32 --out-dtype float32
    """
    from dist_svc.bench.merge import bench_merge, merge_methods
    from dist_svc.bench.suites import machine_description

    if method not in merge_methods():
        raise DistSvcError(f"--method: {method!r} is not one of {', '.join(merge_methods())}.")
    h, i, v = SHAPES[shape]
    h, i, v = hidden or h, intermediate or i, vocab or v
    tool = None if mergekit == "none" else mergekit
    rows = bench_merge(workdir, method=method, layers=tuple(int(x) for x in layers.split(",")), hidden=h,
                       intermediate=i, vocab=v, in_dtype=in_dtype, out_dtype=out_dtype, k=k, repeats=repeats,
                       mergekit=tool, log=_say)
    click.echo(f"{method}, K={k}, hidden {h}, MLP {i}, vocabulary {v}, {in_dtype} in, {out_dtype} out, "
               f"median of {repeats}, on {machine_description('cpu')}")
    click.echo(f"{'layers':>6}{'params':>8}{'dist-svc s':>12}{'MiB':>7}" +
               (f"{'mergekit s':>12}{'MiB':>7}{'time':>8}{'memory':>8}  output" if tool else ""))
    for r in rows:
        line = f"{r['layers']:>6}{r['params'] / 1e6:>7.0f}M{r['dist-svc_wall_s']:>12.1f}{r['dist-svc_peak_mib']:>7.0f}"
        if tool and r.get("mergekit_error"):
            line += f"  mergekit failed: {r['mergekit_error']}"
        elif tool:
            line += (f"{r['mergekit_wall_s']:>12.1f}{r['mergekit_peak_mib']:>7.0f}{r['time_ratio']:>7.2f}x"
                     f"{r['memory_ratio']:>7.2f}x  {r['agreement']}")
        click.echo(line)
    if json_path:
        json_path.write_text(json.dumps({"machine": machine_description("cpu"), "rows": rows}, indent=1))


@bench.command("sweep")
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-out"))
@click.option("--layers", default=4, show_default=True, help="Decoder layers of the generated model.")
@click.option("--shape", type=click.Choice(sorted(SHAPES)), default="llama-2048", show_default=True,
              help="Matrix sizes (as for `bench merge`).")
@click.option("--dtype", "in_dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="float32",
              show_default=True, help="dtype of the generated inputs.")
@click.option("--out-dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="float32",
              show_default=True)
@click.option("-k", "--models", "k", default=3, show_default=True, help="Number of fine-tunes.")
@click.option("--lambdas", default="0.3,0.5,1.0", show_default=True, help="The sweep's values of lambda.")
@click.option("--alphas", default="0.3333,1.0", show_default=True, help="The sweep's values of alpha (calibrated).")
@click.option("--calibrate/--no-calibrate", default=True, show_default=True)
@click.option("--cluster", default=None, help="Run both on this Ray cluster ('auto': RAY_ADDRESS or the local one).")
@click.option("--separate", is_flag=True, help="Also time merging each variant on its own (slow: one merge each).")
@click.option("--repeats", default=3, show_default=True, help="Measured rounds (the median is shown).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the row, with the machine, to this JSON file.")
def bench_sweep_cmd(workdir: Path, layers: int, shape: str, in_dtype: str, out_dtype: str, k: int, lambdas: str,
                    alphas: str, calibrate: bool, cluster: str | None, separate: bool, repeats: int,
                    json_path: Path | None) -> None:
    """Time a sweep of task arithmetic (lambda x alpha, calibrated: 6 variants) against one merge
    of the same config, in the same rounds.

    \b
    Example:
      dist-svc bench sweep ./bench-out --layers 4 --shape llama-2048
      dist-svc bench sweep ./bench-out --no-calibrate --cluster auto
    """
    from dist_svc.bench.merge import bench_sweep
    from dist_svc.bench.suites import machine_description

    h, i, v = SHAPES[shape]
    row = bench_sweep(workdir, layers=layers, hidden=h, intermediate=i, vocab=v, in_dtype=in_dtype,
                      out_dtype=out_dtype, k=k, repeats=repeats, lambdas=[float(x) for x in lambdas.split(",")],
                      alphas=[float(x) for x in alphas.split(",")], calibrate=calibrate, cluster=cluster,
                      separate=separate, log=_say)
    where = f"cluster {cluster}" if cluster else "local executor"
    click.echo(f"task arithmetic sweep, {row['variants']} variants, K={k}, {layers} layers, hidden {h}, "
               f"{row['params'] / 1e6:.0f}M params, calibration {'on' if calibrate else 'off'}, {where}, "
               f"median of {repeats}, on {machine_description('cpu')}")
    click.echo(f"one merge {row['one merge_wall_s']:.1f} s, {row['one merge_peak_mib']:.0f} MiB; "
               f"sweep {row['sweep_wall_s']:.1f} s, {row['sweep_peak_mib']:.0f} MiB: "
               f"{row['time_ratio']:.2f}x the time, {row['memory_ratio']:.2f}x the memory of one merge"
               + (f"; separate merges {row['separate_wall_s']:.1f} s ({row['separate_ratio']:.2f}x)" if separate else ""))
    if json_path:
        json_path.write_text(json.dumps({"machine": machine_description("cpu"), "row": row}, indent=1))


@bench.command("throughput")
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-out"))
@click.option("--layers", default=4, show_default=True, help="Decoder layers of the generated model.")
@click.option("--hidden", default=4096, show_default=True, help="Hidden size (MLP size 3.5x of it).")
@click.option("-k", "--models", "k", default=3, show_default=True, help="Number of fine-tunes.")
@click.option("--device", default=None, help="cpu, cuda, ... (default: cuda when present).")
@click.option("--threads", default=None, type=int, help="Units in flight at once (default 2 on a CPU, 4 on a GPU).")
@click.option("--calibrate/--no-calibrate", default=True, show_default=True)
@click.option("--repeats", default=3, show_default=True, help="Measured rounds (the median is shown).")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the merge writes (default: beside the inputs, sharing their storage).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the result to this JSON file.")
def bench_throughput_cmd(workdir: Path, layers: int, hidden: int, k: int, device: str | None, threads: int | None,
                         calibrate: bool, repeats: int, out_dir: Path | None, json_path: Path | None) -> None:
    """End to end: how many input bytes per second a merge consumes, against what the storage
    delivers to a plain parallel reader of the same files, page cache emptied before each (as
    root; otherwise both read from the page cache and the output says so).

    \b
    Example:
      sudo dist-svc bench throughput /nvme/bench --device cuda --layers 8
    """
    from dist_svc.bench.suites import bench_throughput

    r = bench_throughput(workdir, layers=layers, hidden=hidden, intermediate=hidden * 7 // 2, k=k, device=device,
                         threads=threads, calibrate=calibrate, repeats=repeats, out_dir=out_dir, log=_say)
    cache = "storage (page cache emptied)" if r["cold_cache"] else "page cache (not root: could not empty it)"
    click.echo(f"{r['params'] / 1e9:.2f}B parameters x {k + 1} checkpoints, {human_bytes(r['input_bytes'])} read "
               f"from {cache}, on {r['machine']}, {r['threads']} threads, calibration "
               f"{'on' if calibrate else 'off'}")
    click.echo(f"  plain parallel read: {r['storage_read_gbps']:.2f} GB/s")
    click.echo(f"  merge:               {r['merge_input_gbps']:.2f} GB/s of input = {100 * r['ratio']:.0f}% of it")
    total = sum(r["stage_seconds"].values()) or 1.0
    click.echo("  workers' time:       " + ", ".join(f"{stage} {100 * s / total:.0f}%"
                                                 for stage, s in sorted(r["stage_seconds"].items(), key=lambda kv: -kv[1]))
               + f"; limited by {r['limited_by']}")
    if json_path:
        json_path.write_text(json.dumps(r, indent=1))


@bench.command("tensors")
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-out"))
@click.option("--layers", default="2,24,61", show_default=True,
              help="MoE layer counts (256 tiny experts each): 1.5k, 18.6k, 47k tensors.")
@click.option("--repeats", default=3, show_default=True, help="Measured runs (the median is shown).")
@click.option("--mergekit", default="none", show_default=True, help="mergekit-yaml to compare with, or 'none'.")
def bench_tensors_cmd(workdir: Path, layers: str, repeats: int, mergekit: str) -> None:
    """Cost per tensor as the number of tensors grows (MoE-layout models, 1 MB shards), with
    calibration off and on; a no-op rerun and `status` of the finished merge.

    \b
    Example:
      dist-svc bench tensors ./bench-out --layers 2,24,61
    """
    from dist_svc.bench.suites import bench_tensors

    rows = bench_tensors(workdir, tuple(int(x) for x in layers.split(",")), repeats=repeats,
                         mergekit=None if mergekit == "none" else mergekit, log=_say)
    click.echo(f"{'tensors':>8}{'plain ms/t':>11}{'svc ms/t':>10}{'no-op s':>9}{'status s':>10}{'MiB':>7}"
               + (f"{'mergekit ms/t':>15}" if mergekit != "none" else ""))
    for r in rows:
        click.echo(f"{r['tensors']:>8}{r['plain_ms_per_tensor']:>11.2f}{r['svc_ms_per_tensor']:>10.2f}"
                   f"{r['noop_rerun_s']:>9.2f}{r['status_s']:>10.2f}{r['plain_peak_mib']:>7.0f}"
                   + (f"{r['mergekit_ms_per_tensor']:>15.2f}" if mergekit != "none" else ""))


@bench.command("frontier")
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-out"))
@click.option("--models", default="llama-405b,deepseek-v3", show_default=True)
def bench_frontier_cmd(workdir: Path, models: str) -> None:
    """Dry runs of a 3-way merge of Llama-3.1-405B- and DeepSeek-V3-shaped models whose files
    are real headers over holes (sparse files): memory and time as the dry run projects them.

    \b
    Example:
      dist-svc bench frontier ./bench-out
    """
    from dist_svc.bench.suites import bench_frontier

    bench_frontier(workdir, tuple(models.split(",")), log=lambda line: click.echo(line))


@bench.command("estimate")
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-out"))
@click.option("--repeats", default=1, show_default=True)
def bench_estimate_cmd(workdir: Path, repeats: int) -> None:
    """The dry run's time estimate against the measured merge, dense and MoE, calibration off
    and on.

    \b
    Example:
      dist-svc bench estimate ./bench-out
    """
    from dist_svc.bench.suites import bench_estimate

    for r in bench_estimate(workdir, repeats=repeats, log=_say):
        click.echo(f"{r['case']:<6} calibration {'on ' if r['calibrate'] else 'off'} estimated {r['estimated_s']:7.1f} s"
                   f"  measured {r['measured_s']:7.1f} s  {r['ratio']:.2f}x  (the dry run took {r['dry_run_s']:.1f} s)")


@bench.command("scaling")
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-out"))
@click.option("--threads", default=None, help="Worker counts, e.g. 1,2,4 (default: 1 and every core).")
@click.option("--repeats", default=3, show_default=True)
def bench_scaling_cmd(workdir: Path, threads: str | None, repeats: int) -> None:
    """Speed-up from one worker to every core, and whether the bytes stay the same.

    \b
    Example:
      dist-svc bench scaling ./bench-out
    """
    from dist_svc.bench.suites import bench_scaling

    rows = bench_scaling(workdir, tuple(int(x) for x in threads.split(",")) if threads else None, repeats, log=_say)
    for r in rows:
        click.echo(f"{r['threads']:>3} worker(s) {r['seconds']:7.1f} s  {r['speedup']:.2f}x  same bytes: {r['same_bytes']}")


@bench.command("read")
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-out"))
@click.option("--hidden", default=4096, show_default=True, help="Hidden size of the generated model.")
@click.option("--layers", default=2, show_default=True, help="Decoder layers of the generated model.")
@click.option("--repeats", default=3, show_default=True, help="Timed reads per format (the median is shown).")
@click.option("--remote", default=None, metavar="URL",
              help="Also read the stores from object storage (e.g. s3://bucket/bench; uploaded there once; "
                   "endpoint and credentials from the environment, e.g. AWS_ENDPOINT_URL).")
def bench_read_cmd(workdir: Path, hidden: int, layers: int, repeats: int, remote: str | None) -> None:
    """Read rate of one bf16 checkpoint as safetensors, zarr and zarr+zstd, read the way a worker
    reads (row blocks, one thread), from storage (page cache emptied, as root) and from memory,
    and with --remote from object storage.

    \b
    Example:
      sudo dist-svc bench read ./bench-out
      dist-svc bench read ./bench-out --remote s3://my-bucket/bench
    """
    from dist_svc.bench.suites import bench_read

    rows = bench_read(workdir, hidden=hidden, layers=layers, repeats=repeats, log=_say, remote=remote)
    click.echo(f"{'format':<20}{'cache':>6}{'GB/s':>8}{'on disk':>12}")
    for r in rows:
        click.echo(f"{r['format']:<20}{r['cache']:>6}{r['gbps']:>8.2f}{human_bytes(r['bytes_on_disk']):>12}")


@bench.command("lora")
@click.option("--scale", default=8, show_default=True,
              help="Divide each Llama-3-70B dimension by this (1: full size, minutes of float64 on a CPU).")
@click.option("-k", "--models", "k", default=3, show_default=True, help="Number of LoRA adapters.")
@click.option("--rank", default=16, show_default=True, help="Rank of each adapter.")
@click.option("--repeats", default=3, show_default=True, help="Timed runs per path (the median is shown).")
def bench_lora_cmd(scale: int, k: int, rank: int, repeats: int) -> None:
    """SVC of a merge of K LoRA adapters: the dense float64 Gram path (what a merge of dense
    checkpoints computes) against the factored path (QRs of the stacked factors, an SVC of size
    sum(r)), with the difference between their results.

    \b
    Example:
      dist-svc bench lora --scale 8
    """
    import torch

    from dist_svc.bench.suites import bench_lora, machine_description

    torch.set_num_threads(1)
    click.echo(f"SVC of K={k} LoRA task vectors of rank {rank}, scale 1/{scale}, median of {repeats}, on "
               f"{machine_description('cpu')}")
    click.echo(f"{'matrix':<22}{'shape':>13}{'dense gram (s)':>16}{'factored (s)':>14}{'speed-up':>10}"
               f"{'difference':>12}")
    for row in bench_lora(scale=scale, k=k, rank=rank, repeats=repeats):
        click.echo(f"{row['matrix']:<22}{row['shape']:>13}{row['dense_s']:>16.4f}{row['factored_s']:>14.5f}"
                   f"{row['speedup']:>9.0f}x{row['difference']:>12.1e}")
