"""`dist-svc status`: how far a merge has come, from its manifest."""

from __future__ import annotations

import sys

import click

from dist_svc.progress import human_bytes


@click.command("status")
@click.argument("out_dir")
def status_command(out_dir: str) -> None:
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
