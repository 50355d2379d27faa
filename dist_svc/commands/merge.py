"""`dist-svc merge` (and `mergekit-yaml`, the same command): mergekit-yaml's flags with their
meaning in dist-svc, the executor the options ask for, and the dry run's plan in numbers."""

from __future__ import annotations

import os
from pathlib import Path

import click

from dist_svc.errors import DistSvcError
from dist_svc.progress import human_bytes, human_seconds, say
from dist_svc.storage.output import format_names


# mergekit-yaml's flags that change nothing in dist-svc: accepted, each said in one line, and why.
_MERGEKIT_NO_OPS = {
    "lazy_unpickle": "dist-svc reads safetensors with positional reads and unpickles nothing",
    "trust_remote_code": "dist-svc runs no model code",
    "low_cpu_memory": "dist-svc streams tensors in blocks: memory does not grow with the model",
    "read_to_gpu": "with --cuda (--device cuda) inputs go to the GPU as they are read",
    "multi_gpu": "--cluster runs a merge on several GPUs",
    "clone_tensors": "every output tensor is written once, in place",
    "async_write": "workers write their tensors in place as they finish",
    "write_threads": "workers write their tensors in place as they finish",
    "lora_merge_cache": "dist-svc applies LoRA adapters (BASE+ADAPTER, or an adapter of the base_model) itself, "
                        "from their factors block by block, and never writes a merged copy of a model to cache",
    "lora_merge_dtype": "dist-svc applies LoRA adapters itself, from their factors in float64, rounding once "
                        "(docs/storage.md says to what); the dtype given is not used",
}


def _mergekit_options(f):
    """mergekit-yaml's flags (mergekit 0.1.5's MergeOptions), with their meaning in dist-svc
    (docs/methods.md has the table)."""
    flags = [
        click.option("--cuda/--no-cuda", default=None, help="mergekit: compute on the GPU (--device cuda)."),
        click.option("--copy-tokenizer/--no-copy-tokenizer", default=None,
                     help="Write the donor's tokenizer files (default: yes, as mergekit)."),
        click.option("--random-seed", type=int, default=None, help="The seed of DARE's and DELLA's random drops."),
        click.option("--allow-crimes/--no-allow-crimes", default=None,
                     help="Merge models whose config.json names different architectures."),
        click.option("-v", "verbosity", count=True, help="Log lines and the plan instead of a progress bar."),
        click.option("--quiet/--no-quiet", default=None, help="No progress output."),
        click.option("-j", "--num-threads", type=int, default=None, help="mergekit's CPU threads: units in flight."),
        click.option("--gpu-rich", is_flag=True, default=None, help="mergekit: --cuda and more; here --cuda."),
        click.option("--safe-serialization/--no-safe-serialization", default=None,
                     help="Always safetensors (or zarr): --no-safe-serialization is refused."),
        click.option("--unsafe-truncate-embeddings/--no-unsafe-truncate-embeddings", default=None,
                     help="Refused: use `tokenizer_source` to merge different vocabularies."),
        click.option("--transformers-cache", default=None, metavar="DIR",
                     help="The Hugging Face cache that Hub model IDs are read from and downloaded into, as "
                          "mergekit's (the same as HF_HUB_CACHE=DIR; with --cluster, the nodes' own HF_HUB_CACHE)."),
        click.option("--write-model-card/--no-write-model-card", default=None,
                     help="Write README.md, a model card: method, models, config, what calibration did "
                          "(default: yes, as mergekit). One already in OUT_DIR is never replaced."),
    ]
    for name, why in _MERGEKIT_NO_OPS.items():
        flag, help_text = name.replace("_", "-"), f"mergekit's; no effect here: {why}."
        if name in ("lora_merge_cache", "lora_merge_dtype"):
            flags.append(click.option(f"--{flag}", default=None, help=help_text))
        elif name == "write_threads":
            flags.append(click.option(f"--{flag}", type=int, default=None, help=help_text))
        else:
            flags.append(click.option(f"--{flag}/--no-{flag}", default=None, help=help_text))
    for flag in reversed(flags):
        f = flag(f)
    return f


def _apply_mergekit_options(mk: dict, device: str | None, threads: int | None, progress: str) -> tuple:
    """(device, threads, progress, config options, whether to write the model card) from
    mergekit's flags; says what changes nothing, refuses what dist-svc cannot do."""
    if mk["safe_serialization"] is False:
        raise DistSvcError("--no-safe-serialization: dist-svc writes safetensors (or zarr) only, never pickles.")
    if mk["unsafe_truncate_embeddings"]:
        raise DistSvcError("--unsafe-truncate-embeddings is not supported: it cuts every vocabulary to the smallest "
                           "and assumes the token ids agree. Set `tokenizer_source: base` (or union) in the config to "
                           "merge the embeddings token by token.")
    for name, why in _MERGEKIT_NO_OPS.items():
        if mk[name] is not None and mk[name] is not False:
            say(f"note: --{name.replace('_', '-')} changes nothing here: {why}.")
    if mk["transformers_cache"]:
        os.environ["HF_HUB_CACHE"] = mk["transformers_cache"]  # read by dist_svc.storage.hub at every resolve
    if mk["cuda"] or mk["gpu_rich"]:
        device = device or "cuda"  # the executor checks the device before anything is written
    threads = threads if threads is not None else mk["num_threads"]
    if mk["quiet"]:
        progress = "off"
    elif mk["verbosity"] and progress == "auto":
        progress = "log"
    options = {"copy_tokenizer": mk["copy_tokenizer"], "allow_crimes": mk["allow_crimes"],
               "random_seed": mk["random_seed"]}
    return device, threads, progress, options, mk["write_model_card"] is not False


@click.command("merge")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_dir")
@click.option("--calibrate/--no-calibrate", default=None,
              help="Turn Singular Value Calibration on or off (overrides the config's `calibrate:`).")
@click.option("--shard-size", "--out-shard-size", "shard_size", default=None,
              help="Largest output shard in bytes, e.g. 5GB, 500MB, 2GiB, 5B (5 billion, as mergekit's "
                   "--out-shard-size, whose writer counts bytes); default: the config's `output: {shard_size: ...}`, "
                   "else 5GB.")
@click.option("--progress", type=click.Choice(["auto", "bar", "log", "off"]), default="auto", show_default=True,
              help="A progress bar on a terminal, plain log lines otherwise.")
@click.option("--cluster", "cluster", default=None, metavar="ADDRESS",
              help="Run on a Ray cluster: its address, or 'auto' (RAY_ADDRESS, else the local one). "
                   "Inputs and OUT_DIR must be on storage every node sees: a shared filesystem, or s3:// "
                   "(and gs:// inputs).")
@click.option("--threads", default=None, type=int,
              help="Local executor: units in flight at most (default: the CPU's cores; 8 on a GPU); the memory "
                   "limit decides how many fit at once. Refused with --cluster (2 per actor there).")
@click.option("--memory-limit", default=None, metavar="SIZE",
              help="Memory the units in flight may hold, e.g. 16GiB (per actor with --cluster); default: what the "
                   "machine has, minus 10% (at least 1 GiB). A unit starts only when it fits.")
@click.option("--device", default=None, metavar="DEVICE",
              help="Local executor: cpu, cuda, cuda:1, ... (default: cuda when a GPU is present, else cpu). With "
                   "--cluster: cpu or cuda, for every actor (default: a GPU each when the cluster has GPUs).")
@click.option("--output-format", type=click.Choice(format_names()), default=None,
              help="Overrides the config's `output: {format: ...}`; default safetensors, or zarr when "
                   "OUT_DIR ends in .zarr. peft: LoRA adapters of the base merged as one PEFT adapter.")
@click.option("-I", "--intermediate-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A config of several YAML documents (stages): where the named stages go "
                   "(default: OUT_DIR.stages next to OUT_DIR).")
@click.option("--dry-run", is_flag=True,
              help="Print the plan in numbers (tensors, bytes, memory per worker, estimated time) and stop; "
                   "nothing is merged or written.")
@_mergekit_options
def merge_command(config: Path, out_dir: str, calibrate: bool | None, shard_size: str | None, progress: str,
          cluster: str | None, threads: int | None, memory_limit: str | None, device: str | None,
          output_format: str | None, intermediate_dir: Path | None, dry_run: bool, **mergekit_flags) -> None:
    """Merge the models of CONFIG (a mergekit YAML) into OUT_DIR.

    OUT_DIR gets a Hugging Face checkpoint (sharded safetensors + index, config and tokenizer
    files of the base). Rerun the same command to resume an interrupted merge: finished tensors
    are kept, and the result is byte-identical to an uninterrupted run. A CONFIG of several YAML
    documents (mergekit-multimerge's stages) runs stage by stage. mergekit-yaml's flags are
    accepted with their meaning (docs/methods.md); `dist-svc mergekit-yaml` is this command.

    \b
    Example:
      dist-svc merge configs/llama3-70b-ta-svc.yaml ./merged
      dist-svc merge mergekit.yaml ./merged --no-calibrate --shard-size 2GB
      dist-svc mergekit-yaml mergekit.yaml ./merged --cuda --out-shard-size 1B --lazy-unpickle
      dist-svc merge configs/llama3-70b-ta-svc.yaml /shared/merged --cluster auto
      dist-svc merge configs/zarr-ta-svc.yaml ./merged.zarr      # a zarr v3 store
      dist-svc merge configs/llama3-70b-ta-svc.yaml ./merged --dry-run
    """
    from dist_svc.config import parse_size
    from dist_svc.executors import ExecutionOptions, build_executor
    from dist_svc.stages import load_stages, merge_stages
    from dist_svc.storage.outdir import output_dir

    device, threads, progress, options, model_card = _apply_mergekit_options(mergekit_flags, device, threads,
                                                                              progress)
    execution = ExecutionOptions(device=device, threads=threads,
                                 memory_limit=None if memory_limit is None else parse_size(memory_limit))
    stages = load_stages(config, out_dir, intermediate_dir, calibrate)
    if progress != "off":
        for stage in stages:
            for note in stage.config.notes:
                say(f"note: {note}")
    executor = build_executor(cluster, execution, log=say)  # options that do not apply are refused here
    if dry_run:
        for stage in stages:
            if len(stages) > 1:
                click.echo(f"stage {stage.name or 'final'} -> {stage.out_dir}")
            if any(not output_dir(s.out_dir).exists() for s in stages if s.name in stage.needs):
                click.echo(f"  reads stage(s) {', '.join(stage.needs)}, not merged yet: no plan before they are")
                continue
            _print_dry_run(stage.config.with_options(**options), stage.out_dir, shard_size, output_format, executor)
        return
    for report in merge_stages(stages, lambda c: c.with_options(**options), log=say, shard_size=shard_size,
                               progress=progress, executor=executor, output_format=output_format,
                               model_card=model_card):
        print_report(report)


def _print_dry_run(config, out_dir, shard_size, output_format, executor) -> None:
    """The plan in numbers, for the executor the merge would run on: its memory (this machine's,
    or each actor's on a cluster) decides what fits; the rates are probed on this machine."""
    from dist_svc.driver import dry_run, settle
    from dist_svc.estimate import at_once
    from dist_svc.storage.location import is_url

    settled, out = settle(config, out_dir, None, output_format, shard_size)
    if settled.output.format == "peft":
        _print_adapter_dry_run(settled, out)
        return
    executor.connect()  # a device or cluster that is not there is refused as a merge refuses it, before any probe
    capacity = executor.capacity()
    workers = capacity.workers
    plan, est, existing = dry_run(config, out_dir, shard_size=shard_size, output_format=output_format,
                                  device=capacity.device if capacity.here else None, workers=workers)
    name, need = est.largest
    fit = at_once(need, capacity)
    click.echo(f"dry run: nothing merged, nothing written. {plan.summary()}")
    if existing is not None and existing["units_done"] == existing["units_total"]:
        click.echo(f"  {out_dir}: this merge is already complete ({existing['units_total']} tensors); nothing to do")
        return
    if existing is not None:
        click.echo(f"  {out_dir}: resumes a merge with {existing['units_done']}/{existing['units_total']} "
                   f"tensors done; the figures below are for the {est.tensors} left")
    if not capacity.here:
        click.echo(f"  runs on     {executor.describe()}")
    click.echo(f"  read        {human_bytes(est.read_bytes)} from {len(plan.inputs)} checkpoints (probed here, "
               f"reading {human_bytes(est.probe_bytes)}: {human_bytes(est.read_rate)}/s by one reader, "
               f"{human_bytes(est.parallel_read_rate)}/s by {workers}, {est.latency * 1e3:.2f} ms a request)")
    remote = f" (counted at the inputs' read rates: writes to {str(out_dir).split('://')[0]}:// are not probed)"
    click.echo(f"  write       {human_bytes(est.write_bytes)}{remote if is_url(str(out_dir)) else ''}")
    click.echo(f"  compute     {est.element_seconds * 1e9:.1f} ns per element merged and hashed ({workers} at once: "
               f"{workers * est.parallel:.1f}x one's speed); "
               f"{est.gram_flops / 1e12:.1f} TFLOP float64 for calibration at {est.flop_rate / 1e9:.1f} GFLOP/s per worker")
    memory = capacity.memory
    gpu = f", {human_bytes(memory.device)} on the GPU" if memory.device else ""
    room = "available" if capacity.here else f"for each of {capacity.pools} {capacity.pool}s"
    if capacity.device == "cuda" and not memory.device:
        room += " (their GPUs' memory is checked as they start)"
    click.echo(f"  memory      {human_bytes(est.worker_memory_bytes)} for the largest tensor ({name}); "
               f"{human_bytes(memory.host)} {room}{gpu}: {fit} of those at once")
    if fit < 1:
        click.echo(f"  warning     {name} does not fit the memory limit: the merge would be refused. Raise "
                   f"--memory-limit or use a machine with more memory.")
    if capacity.here:
        click.echo(f"  time        about {human_seconds(est.seconds)} ({est.seconds:.0f} s) here with {workers} worker(s)")
    else:
        click.echo(f"  time        about {human_seconds(est.seconds)} ({est.seconds:.0f} s) with {workers} worker(s) "
                   f"at the rates probed here (on this machine, not on the {capacity.pool}s' machines)")
    for where, seconds in est.gpu_seconds.items():
        click.echo(f"              about {human_seconds(seconds)} on {where} (projected from one H100's measured rates)")
    if existing is None:
        click.echo(f"  {out_dir}: a new merge")


def _print_adapter_dry_run(config, out_dir) -> None:
    """The merge of LoRA adapters as one adapter (dist_svc.lowrank) that `output: {format: peft}` runs."""
    from dist_svc.lowrank import dry_run_adapters
    from dist_svc.storage.adapter_output import CONFIG_NAME, WEIGHTS_NAME

    plan, state = dry_run_adapters(config, out_dir)
    how = ("QRs of the adapters' stacked factors, then an SVC of a core of rank <= the sum of their ranks"
           if plan.calibrated else "the weighted sum of the adapters' factors, no calibration")
    click.echo(f"dry run: nothing merged, nothing written. {plan.summary()}")
    click.echo(f"  computes    {len(plan.factored)} matrices as factors ({how}); {len(plan.dense)} densely "
               f"(biases, vectors, modules_to_save); unchanged, and not in the adapter: {plan.unchanged} of the base's "
               f"tensors")
    click.echo(f"  write       {WEIGHTS_NAME} ({plan.tensors} tensors, {human_bytes(plan.nbytes)}) and {CONFIG_NAME}, "
               f"in one process, in seconds")
    click.echo(f"  {out_dir}: " + ("already holds this merge: nothing to do" if state == "finished" else "a new merge"))


def print_report(report) -> None:
    """One line: what a merge did, or that there was nothing to do."""
    if report.already_complete:
        click.echo(f"{report.out_dir}: this merge is already complete ({report.units_total} tensors); nothing to do.")
        return
    resumed = report.units_total - report.units_run
    extra = f", {resumed} already done by an earlier run" if resumed else ""
    click.echo(f"merged {report.units_run} tensors in {human_seconds(report.seconds)}{extra} -> {report.out_dir}")
