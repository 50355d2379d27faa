"""`dist-svc sweep`: many merges of one config's inputs, one per combination of values
(dist_svc.batch)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dist_svc.progress import say


@click.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_dir")
@click.option("--set", "sets", multiple=True, required=True, metavar="KEY=V1,V2,...",
              help="An axis: a dotted path into the config and its values (parameters.lambda=0.5,1.0; "
                   "calibrate.alpha=0.33,1; models.1.parameters.weight=0.5,2; merge_method=ties,dare_ties). "
                   "Repeat for more axes: every combination is one variant.")
@click.option("--eval", "eval_command", default=None, metavar="CMD",
              help="Run CMD on each finished variant, {model} replaced by its directory; the score is the last "
                   "number CMD prints. Recorded in sweep.json, with the best variant.")
@click.option("--minimize", is_flag=True, help="The best score is the lowest (default: the highest).")
@click.option("--calibrate/--no-calibrate", default=None,
              help="Calibrate every variant, or none (default: as the config says).")
@click.option("--shard-size", default=None, metavar="SIZE", help="Largest output shard, as `merge` takes it.")
@click.option("--progress", type=click.Choice(["auto", "bar", "log", "off"]), default="auto", show_default=True)
@click.option("--cluster", default=None, metavar="ADDRESS", help="Run on a Ray cluster, as `merge` does.")
@click.option("--threads", default=None, type=int, help="Units in flight at once, as `merge` takes it.")
@click.option("--memory-limit", default=None, metavar="SIZE", help="Memory the units may hold, as `merge` takes it.")
@click.option("--device", default=None, metavar="DEVICE", help="cpu, cuda, cuda:1, as `merge` takes it.")
@click.option("--output-format", default=None, help="As `merge` takes it.")
def sweep(config: Path, out_dir: str, sets: tuple[str, ...], eval_command: str | None, minimize: bool,
          calibrate: bool | None, shard_size: str | None, progress: str, cluster: str | None, threads: int | None,
          memory_limit: str | None, device: str | None, output_format: str | None) -> None:
    """Merge every combination of the --set values of CONFIG, each into its own directory under
    OUT_DIR, and list them in OUT_DIR/sweep.json and sweep.csv (with scores and the best one
    when --eval is given). Each variant is what `dist-svc merge` writes for the config with its
    values set. Rerun the same command to resume; add values to merge only the new variants.

    \b
    Example:
      dist-svc sweep merge.yaml ./sweep --set parameters.lambda=0.5,1.0,1.5 --set calibrate.alpha=0.33,1
      dist-svc sweep merge.yaml ./sweep --set parameters.density=0.2,0.5 --eval 'python eval.py {model}'
    """
    from dist_svc.config import parse_size
    from dist_svc.executors import build_executor
    from dist_svc.batch import sweep as run_sweep

    memory = None if memory_limit is None else parse_size(memory_limit)
    executor = build_executor(cluster=cluster, device=device, threads=threads, memory_limit=memory, log=say)
    report = run_sweep(config, out_dir, sets, eval_command=eval_command, minimize=minimize, calibrate=calibrate,
                       log=say if progress != "off" else (lambda line: None), executor=executor,
                       shard_size=shard_size, progress=progress, output_format=output_format)
    if report.failed:
        click.echo(f"error: {len(report.failed)} of {len(report.variants)} variants have no result:\n" +
                   "\n".join(f"  {v.path}: {v.error}" for v in report.failed) +
                   f"\nThe others are complete and listed in {report.out_dir}/sweep.json. Fix the cause and "
                   f"rerun the same command: finished variants are kept.", err=True)
        sys.exit(1)
    click.echo(f"{len(report.variants)} variants in {report.out_dir} ({report.seconds:.1f} s); "
               f"listed in {report.out_dir}/sweep.json" + (f"; best: {report.best}" if report.best else ""))
