"""The `dist-svc` command line: a thin shell over the Python API (`dist_svc.merge`, ...)."""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import threading
from pathlib import Path

import click

from dist_svc.errors import DistSvcError
from dist_svc.progress import human_bytes, human_seconds, say
from dist_svc.storage.output import format_names


def _say(line: str) -> None:
    say(line)  # above the progress bar while one is drawn


class _Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's stop), raised where Ctrl-C's KeyboardInterrupt is: the run
    stops the same way, its records flushed and its lock released."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


class _Group(click.Group):
    """Prints a DistSvcError as one clear paragraph, without a traceback; Ctrl-C and SIGTERM
    say how to go on."""

    def invoke(self, ctx):
        if threading.current_thread() is threading.main_thread():  # where Python runs signal handlers
            signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return super().invoke(ctx)
        except DistSvcError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as e:
            if ctx.invoked_subcommand == "merge":
                click.echo("interrupted. Every tensor finished so far is kept: rerun the same command to resume "
                           "where it stopped.", err=True)
            else:
                click.echo("interrupted.", err=True)
            sys.exit(128 + (signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT))


@click.group(cls=_Group)
@click.version_option(package_name="dist-svc")
def main() -> None:
    """Merge fine-tunes of one base model, with Singular Value Calibration, resumably."""


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
            _say(f"note: --{name.replace('_', '-')} changes nothing here: {why}.")
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


@main.command()
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
                   "limit decides how many fit at once.")
@click.option("--memory-limit", default=None, metavar="SIZE",
              help="Memory the units in flight may hold, e.g. 16GiB (per actor with --cluster); default: what the "
                   "machine has, minus 10% (at least 1 GiB). A unit starts only when it fits.")
@click.option("--device", default=None, metavar="DEVICE",
              help="Local executor: cpu, cuda, cuda:1, ... (default: cuda when a GPU is present, else cpu).")
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
def merge(config: Path, out_dir: str, calibrate: bool | None, shard_size: str | None, progress: str,
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
    from dist_svc.executors import build_executor
    from dist_svc.stages import load_stages, merge_stages
    from dist_svc.storage.outdir import output_dir

    device, threads, progress, options, model_card = _apply_mergekit_options(mergekit_flags, device, threads,
                                                                              progress)
    memory = None if memory_limit is None else parse_size(memory_limit)
    stages = load_stages(config, out_dir, intermediate_dir, calibrate)
    if progress != "off":
        for stage in stages:
            for note in stage.config.notes:
                _say(f"note: {note}")
    if dry_run:
        for stage in stages:
            if len(stages) > 1:
                click.echo(f"stage {stage.name or 'final'} -> {stage.out_dir}")
            if any(not output_dir(s.out_dir).exists() for s in stages if s.name in stage.needs):
                click.echo(f"  reads stage(s) {', '.join(stage.needs)}, not merged yet: no plan before they are")
                continue
            _print_dry_run(stage.config.with_options(**options), stage.out_dir, None, shard_size, output_format,
                           device, threads, memory)
        return

    executor = build_executor(cluster=cluster, device=device, threads=threads, memory_limit=memory, log=_say)
    for report in merge_stages(stages, lambda c: c.with_options(**options), log=_say, shard_size=shard_size,
                               progress=progress, executor=executor, output_format=output_format,
                               model_card=model_card):
        _print_report(report)


main.add_command(merge, name="mergekit-yaml")


@main.command()
@click.argument("out_dir")
def status(out_dir: str) -> None:
    """Show how far the merge in OUT_DIR has come (tensors and bytes done of total). Exits 1 if
    its last run failed (the error is shown).

    \b
    Example:
      dist-svc status ./merged
    """
    from dist_svc.driver import status as merge_status

    info = merge_status(out_dir)
    pct = 100.0 * info["bytes_done"] / info["bytes_total"] if info["bytes_total"] else 100.0
    hint = info.get("hint") or {"complete": "", "running": "  (a run is in progress)",
            "stopped": "  (rerun the same `dist-svc merge` command to resume)",
            "damaged": "  (files of the finished output are missing or changed since: rerun the same "
                       "`dist-svc merge` command to restore them)",
            "failed": f"  (its last run stopped with an error after {info['units_done']} of {info['units_total']} "
                      f"tensors; see below. Fix its cause, then rerun the same `dist-svc merge` command: it "
                      f"resumes, keeping every tensor finished)"}[info["state"]]
    click.echo(f"{out_dir}: {info['state']}{hint}")
    click.echo(f"  tensors {info['units_done']}/{info['units_total']}")
    click.echo(f"  bytes   {info['bytes_done']}/{info['bytes_total']} "
               f"({human_bytes(info['bytes_done'])} of {human_bytes(info['bytes_total'])}, {pct:.1f}%)")
    for line in info["details"]:
        click.echo(f"  {line}")
    if info["state"] == "failed":
        click.echo(f"  error: {info['error']}")
        sys.exit(1)  # not finished, and a rerun alone may fail the same way


@main.command()
@click.argument("out_dir")
def verify(out_dir: str) -> None:
    """Re-read the merged output in OUT_DIR and check every tensor against the checksum its
    manifest recorded. Exits 1 if anything differs.

    \b
    Example:
      dist-svc verify ./merged
    """
    from dist_svc.driver import status as merge_status
    from dist_svc.driver import verify as verify_output

    problems = verify_output(out_dir)
    info = merge_status(out_dir)
    for p in problems:
        click.echo(f"  {p}", err=True)
    if problems and info["format"] == "peft":  # a merge of adapters: the problem says what to do
        click.echo(f"{out_dir}: {len(problems)} problem(s).{info.get('hint', '')}", err=True)
        sys.exit(1)
    if problems:
        click.echo(f"{out_dir}: {len(problems)} problem(s). Delete the damaged file(s) and rerun the same "
                   f"`dist-svc merge` command: only their tensors are merged again.", err=True)
        sys.exit(1)
    if info["format"] == "peft":
        from dist_svc.storage.adapter_output import FILES

        click.echo(f"{out_dir}: verified: {' and '.join(FILES)} (an adapter of {info['units_done']} tensors) match "
                   f"the checksums recorded when they were written.")
        return
    click.echo(f"{out_dir}: verified: all {info['units_done']} tensors match their checksums and every "
               f"file of the {info['format']} output is present.")


@main.command()
@click.argument("out_dir")
@click.option("--tensors", "patterns", multiple=True, metavar="PATTERN",
              help="Plot the spectra of these matrices (fnmatch, repeatable), e.g. '*layers.3.*'. "
                   "Default: where over-accumulation was strongest.")
@click.option("--top", default=6, show_default=True, help="How many matrices to plot and list.")
@click.option("--out", "prefix", type=click.Path(path_type=Path), default=None,
              help="Write PREFIX.png, PREFIX.json and PREFIX.csv (default: ./<OUT_DIR name>-spectra).")
def inspect(out_dir: str, patterns: tuple[str, ...], top: int, prefix: Path | None) -> None:
    """Show what calibration did to the merge in OUT_DIR (finished or in progress; a local
    directory, an s3:// URL, or a merge of adapters written as one PEFT adapter): per matrix,
    the norm of the merged delta after / before, the share of its energy in directions held more
    than once (shrunk) and in task-specific ones (grown), eta over the whole spectrum, the top
    singular values before and after and the overlap coefficients s_ri (copies of task i in
    direction r). Writes a PNG (heat maps per layer and module, eta per matrix, the spectra of
    chosen matrices) and the table as JSON and CSV. Nothing in OUT_DIR is changed.

    \b
    Example:
      dist-svc inspect ./merged
      dist-svc inspect ./merged --tensors '*layers.10.*' --out reports/llama-ta-svc
    """
    from dist_svc.commands.inspect import inspect as run_inspect
    from dist_svc.driver import out_path

    prefix = prefix or Path(f"{Path(str(out_path(out_dir))).name}-spectra")
    result = run_inspect(out_dir, prefix, patterns, top)
    o = result["overall"]
    click.echo(f"{result['count']} calibrated matrices" + (f", {result['unchanged']} of them unchanged by the "
                                                          f"fine-tunes (a zero delta)" if result["unchanged"] else "") + ".")
    click.echo(o["verdict"])
    if o["matrices"]:
        click.echo(f"Over the whole spectra: the merged updates' energy in directions held more than once "
                   f"(eta > 1) {100 * o['shrunk'][0]:.0f}% -> {100 * o['shrunk'][1]:.0f}% after calibration, in "
                   f"task-specific ones (eta < 1) {100 * o['grown'][0]:.0f}% -> {100 * o['grown'][1]:.0f}%; "
                   f"median norm ratio {o['norm_ratio_median']:.2f} ({o['amplified']} of {o['matrices']} grew).")
        click.echo("Strongest over-accumulation (top singular value before -> after calibration):"
                   if 2 * o["amplified"] <= o["matrices"] else
                   "Top singular value most divided (before -> after calibration):")
    for r in result["strongest"]:
        overlap = ", ".join(f"{x:.2f}" for x in r["overlaps"][0]) if r["overlaps"] else "-"
        click.echo(f"  {r['tensor']:<48} {r['sigma_before'][0]:.4g} -> {r['sigma_after'][0]:.4g} "
                   f"({r['top_ratio']:.2f}x; s_1i = {overlap}; norm x{r['norm_ratio']:.2f})")
    click.echo("wrote " + ", ".join(str(p) for p in result["paths"].values()))


@main.command()
@click.argument("src")
@click.argument("dst")
@click.option("--format", "fmt", type=click.Choice(format_names(convertible=True)), default=None,
              help="Layout of DST (default: zarr when DST ends in .zarr, else safetensors).")
@click.option("--compression", type=click.Choice(["none", "zstd"]), default="none", show_default=True,
              help="zarr output: compress chunks with zstd.")
@click.option("--shard-size", default="5GB", show_default=True,
              help="safetensors output: largest shard, e.g. 5GB.")
@click.option("--progress", type=click.Choice(["auto", "bar", "log", "off"]), default="auto", show_default=True)
@click.option("--trust-pickle", is_flag=True,
              help="Load a .bin/.pt checkpoint whose pickle needs code (a class of the program that saved it). "
                   "This RUNS that code: only for files you trust. Merges never do.")
def convert(src: str, dst: str, fmt: str | None, compression: str, shard_size: str, progress: str,
            trust_pickle: bool) -> None:
    """Convert checkpoint SRC into DST (safetensors or a zarr store). SRC is any model a merge
    reads: a safetensors directory, a zarr store, a legacy .bin/.pt state dict, BASE+ADAPTER (a
    PEFT LoRA adapter merged into its base), a Hub ID or an s3:// (gs://, ...) URL. Every tensor
    is read back and checked after writing; DST appears only when complete, and an existing DST
    is never overwritten. Config and tokenizer files are copied along.

    \b
    Example:
      dist-svc convert ./llama-ft1 ./llama-ft1.zarr
      dist-svc convert ./llama-ft1 ./llama-ft1.zarr --compression zstd
      dist-svc convert ./merged.zarr ./merged-hf
      dist-svc convert ./old-model ./old-model-st          # pytorch_model.bin -> safetensors
      dist-svc convert ./base+./my-lora ./merged-lora      # a LoRA merged into its base
    """
    from dist_svc.commands.convert import convert as run_convert
    from dist_svc.config import parse_size

    result = run_convert(src, dst, fmt=fmt, compression=compression, shard_size=parse_size(shard_size),
                         progress=progress, trust_pickle=trust_pickle)
    click.echo(f"{dst}: {result['tensors']} tensors, {human_bytes(result['bytes'])}, {result['format']}; "
               f"every tensor read back and verified.")


@main.command()
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"))
@click.option("-k", "--models", "k", default=3, show_default=True, help="Number of fine-tunes to generate.")
@click.option("--layers", default=4, show_default=True, help="Decoder layers of the generated model.")
@click.option("--methods", default=None, metavar="M1,M2|all",
              help="Also merge the family with these methods (calibrated) and compare what calibration did "
                   "to each: the over-accumulation before and after.")
def demo(workdir: Path, k: int, layers: int, methods: str | None) -> None:
    """Generate a small Llama-layout base and K fine-tunes in WORKDIR, then merge them with
    task arithmetic + calibration, and show what calibration did.

    Nothing is downloaded. Rerunning reuses the generated models and the finished merges.

    \b
    Example:
      dist-svc demo ./demo-out
      dist-svc demo ./demo-out --methods all      # every method with a base model, side by side
    """
    import torch

    from dist_svc.commands.demo import DEMO_METHODS, DEMO_SHARD_SIZE, TinyLlama, make_family, write_config
    from dist_svc.driver import merge as run_merge

    workdir = workdir.resolve()
    inputs = workdir / "inputs"
    if not (inputs / "base").is_dir():
        _say(f"generating a {layers}-layer Llama-layout base and {k} fine-tunes (bf16) in {inputs}")
        make_family(inputs, k=k, arch=TinyLlama(num_hidden_layers=layers), dtype=torch.bfloat16)
    ft_dirs = sorted((d for d in inputs.iterdir() if d.name.startswith("ft-")), key=lambda d: int(d.name[3:]))
    # The shard size is in the config, not passed beside it: rerunning `dist-svc merge` on the
    # written config and output finds this very merge.
    config = write_config(workdir / "merge.yaml", inputs / "base", ft_dirs, shard_size=DEMO_SHARD_SIZE)
    report = run_merge(config, workdir / "merged", log=_say)
    _print_report(report)
    cal = report.calibration
    if cal:
        ratios = [c["sigma_before"][0] / c["sigma_after"][0] for c in cal.values() if c["sigma_after"][0] > 0]
        click.echo(f"\nWhat calibration did ({len(cal)} matrices, K={len(ft_dirs)}):")
        click.echo(f"  The {len(ft_dirs)} fine-tunes share a low-rank update in every matrix; task arithmetic counts "
                   f"it {len(ft_dirs)} times.")
        click.echo(f"  Top singular value of the merged update, before/after calibration: median ratio "
                   f"{statistics.median(ratios):.2f}x (range {min(ratios):.2f}x..{max(ratios):.2f}x).")
        worst = max(cal.items(), key=lambda kv: kv[1]["eta_max"])
        click.echo(f"  Strongest over-accumulation: {worst[0]}, eta {worst[1]['eta_max']:.2f} "
                   f"(sigma {worst[1]['sigma_before'][0]:.4f} -> {worst[1]['sigma_after'][0]:.4f}).")
    click.echo(f"\nConfig: {config}\nMerged model: {report.out_dir}")
    click.echo(f"See the spectra: dist-svc inspect {report.out_dir}")
    if methods:
        names = list(DEMO_METHODS) if methods == "all" else [m.strip() for m in methods.split(",")]
        unknown = [m for m in names if m not in DEMO_METHODS]
        if unknown:
            raise DistSvcError(f"--methods: {', '.join(unknown)} not among {', '.join(DEMO_METHODS)}.")
        _demo_methods(workdir, inputs / "base", ft_dirs, names)


def _demo_methods(workdir: Path, base: Path, ft_dirs: list[Path], names: list[str]) -> None:
    from dist_svc.commands.demo import DEMO_SHARD_SIZE, calibration_effect, write_method_config
    from dist_svc.driver import merge as run_merge

    click.echo(f"\nCalibration on each method's merge of the same family (K={len(ft_dirs)}; "
               f"energy: mean share of each merged delta's squared norm):")
    click.echo(f"{'method':<18}{'sigma_1 /':>10}{'norm':>7}{'held > once (eta>1)':>21}{'task-specific (eta<1)':>23}")
    click.echo(f"{'':<18}{'before/after':>10}{'ratio':>7}{'before -> after':>21}{'before -> after':>23}")
    for name in names:
        cfg = write_method_config(workdir / f"merge-{name}.yaml", name, base, ft_dirs, shard_size=DEMO_SHARD_SIZE)
        effect = calibration_effect(run_merge(cfg, workdir / f"merged-{name}").calibration)
        if not effect["matrices"]:
            click.echo(f"{name:<18}  (nothing calibrated)")
            continue
        click.echo(f"{name:<18}{effect['top_ratio']:>9.2f}x{effect['norm_ratio']:>7.2f}"
                   f"{100 * effect['shrunk'][0]:>12.0f}% -> {100 * effect['shrunk'][1]:.0f}%"
                   f"{100 * effect['grown'][0]:>14.0f}% -> {100 * effect['grown'][1]:.0f}%")


from dist_svc.bench import bench  # noqa: E402  (after `main`, which it joins)

main.add_command(bench)


def _print_dry_run(config, out_dir, calibrate, shard_size, output_format, device, threads, memory=None) -> None:
    from dist_svc.driver import dry_run, settle
    from dist_svc.executors import build_executor
    from dist_svc.storage.location import is_url

    settled, out = settle(config, out_dir, calibrate, output_format, shard_size)
    if settled.output.format == "peft":
        _print_adapter_dry_run(settled, out)
        return
    executor = build_executor(device=device, threads=threads, memory_limit=memory)
    executor.connect()  # a device that is not there is refused as a merge refuses it, before any probe
    workers = executor.threads
    plan, est, existing = dry_run(config, out_dir, calibrate=calibrate, shard_size=shard_size,
                                  output_format=output_format, device=executor.device, workers=workers)
    limit = executor.budget()
    name, need = est.largest
    # As many of the largest units as fit at once, at most one per worker: what memory allows.
    fit = min(workers, limit.host // max(need.host, 1), limit.device // max(need.device, 1) if need.device else workers)
    click.echo(f"dry run: nothing merged, nothing written. {plan.summary()}")
    if existing is not None and existing["units_done"] == existing["units_total"]:
        click.echo(f"  {out_dir}: this merge is already complete ({existing['units_total']} tensors); nothing to do")
        return
    if existing is not None:
        click.echo(f"  {out_dir}: resumes a merge with {existing['units_done']}/{existing['units_total']} "
                   f"tensors done; the figures below are for the {est.tensors} left")
    click.echo(f"  read        {human_bytes(est.read_bytes)} from {len(plan.inputs)} checkpoints (probed here, "
               f"reading {human_bytes(est.probe_bytes)}: {human_bytes(est.read_rate)}/s by one reader, "
               f"{human_bytes(est.parallel_read_rate)}/s by {workers}, {est.latency * 1e3:.2f} ms a request)")
    remote = f" (counted at the inputs' read rates: writes to {str(out_dir).split('://')[0]}:// are not probed)"
    click.echo(f"  write       {human_bytes(est.write_bytes)}{remote if is_url(str(out_dir)) else ''}")
    click.echo(f"  compute     {est.element_seconds * 1e9:.1f} ns per element merged and hashed ({workers} at once: "
               f"{workers * est.parallel:.1f}x one's speed); "
               f"{est.gram_flops / 1e12:.1f} TFLOP float64 for calibration at {est.flop_rate / 1e9:.1f} GFLOP/s per worker")
    click.echo(f"  memory      {human_bytes(est.worker_memory_bytes)} for the largest tensor ({name}); "
               f"{human_bytes(limit.host)} available{f', {human_bytes(limit.device)} on the GPU' if limit.device else ''}: "
               f"{fit} of those at once")
    if fit < 1:
        click.echo(f"  warning     {name} does not fit the memory limit: the merge would be refused. Raise "
                   f"--memory-limit or use a machine with more memory.")
    click.echo(f"  time        about {human_seconds(est.seconds)} ({est.seconds:.0f} s) here with {workers} worker(s)")
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


def _print_report(report) -> None:
    if report.already_complete:
        click.echo(f"{report.out_dir}: this merge is already complete ({report.units_total} tensors); nothing to do.")
        return
    resumed = report.units_total - report.units_run
    extra = f", {resumed} already done by an earlier run" if resumed else ""
    click.echo(f"merged {report.units_run} tensors in {human_seconds(report.seconds)}{extra} -> {report.out_dir}")


if __name__ == "__main__":
    main()
