"""`dist-svc verify`: a merge's output re-read and checked against the checksums its manifest
(or an adapter's record) holds."""

from __future__ import annotations

import sys

import click


@click.command("verify")
@click.argument("out_dir")
@click.option("--cluster", "cluster", default=None, metavar="ADDRESS",
              help="Read and check the tensors on a Ray cluster's nodes, spread over its actors: its address, "
                   "or 'auto'. OUT_DIR must be on storage every node sees.")
def verify_command(out_dir: str, cluster: str | None) -> None:
    """Re-read the merged output in OUT_DIR and check every tensor against the checksum its
    manifest recorded. Exits 1 if anything differs.

    \b
    Example:
      dist-svc verify ./merged
      dist-svc verify --cluster auto /shared/merged
    """
    from dist_svc.driver import status as merge_status
    from dist_svc.driver import verify as verify_output

    problems = verify_output(out_dir, cluster=cluster)
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
