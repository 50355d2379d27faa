"""The `dist-svc` command line: a thin shell over the Python API (`dist_svc.merge`, ...). Each
command is defined in its own module (dist_svc/commands/) and imported when it runs; this module
assembles them, and turns a DistSvcError, Ctrl-C or SIGTERM into one paragraph."""

from __future__ import annotations

import importlib
import signal
import sys
import threading

import click

from dist_svc.errors import DistSvcError

# name -> ("module:click command", its line in `dist-svc --help`). Imported on use: neither
# `dist-svc --help` nor `dist-svc status` loads torch (tests/test_layers.py keeps the lines true).
COMMANDS = {
    "merge": ("dist_svc.commands.merge:merge_command", "Merge the models of CONFIG (a mergekit YAML) into OUT_DIR."),
    "mergekit-yaml": ("dist_svc.commands.merge:merge_command",  # mergekit's name for the same command
                      "Merge the models of CONFIG (a mergekit YAML) into OUT_DIR."),
    "status": ("dist_svc.commands.status:status_command",
               "Show how far the merge in OUT_DIR has come (tensors and bytes done of total)."),
    "verify": ("dist_svc.commands.verify:verify_command",
               "Re-read the merged output in OUT_DIR and check every tensor against the checksum its manifest "
               "recorded."),
    "inspect": ("dist_svc.commands.inspect:inspect_command", "Show what calibration did to the merge in OUT_DIR."),
    "convert": ("dist_svc.commands.convert:convert_command",
                "Convert checkpoint SRC into DST (safetensors or a zarr store)."),
    "demo": ("dist_svc.commands.demo:demo_command",
             "Generate a small Llama-layout base and K fine-tunes in WORKDIR, then merge them."),
    "bench": ("dist_svc.bench:bench", "Benchmarks: timings are medians, against a baseline measured in the same run."),
    "sweep": ("dist_svc.commands.sweep:sweep",
              "Merge every combination of the --set values of CONFIG, each into its own directory under OUT_DIR."),
}


class _Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's stop), raised where Ctrl-C's KeyboardInterrupt is: the run
    stops the same way, its records flushed and its lock released."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


class _Group(click.Group):
    """Prints a DistSvcError as one clear paragraph, without a traceback; Ctrl-C and SIGTERM
    say how to go on. Finds the commands of COMMANDS in their modules."""

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx, name):
        if name in COMMANDS:
            module, command = COMMANDS[name][0].split(":")
            return getattr(importlib.import_module(module), command)
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter):
        """The commands' list without importing them (their lines from COMMANDS)."""
        rows = []
        for name in self.list_commands(ctx):
            here = None if name in COMMANDS else super().get_command(ctx, name)
            rows.append((name, COMMANDS[name][1] if here is None else here.get_short_help_str(formatter.width - 6)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

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


if __name__ == "__main__":
    main()
