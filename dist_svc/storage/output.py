"""The output layout seam: how a merge's tensors are stored, behind one interface.

An `OutputLayout` is built from the output spec, OUT_DIR and the planned tensors (name, dtype,
shape, in plan order) alone, so the driver, the workers (in any process) and `verify` all
rebuild the same one. It decides where each tensor's bytes go and how a finished output looks;
the driver decides when things happen, and the manifest records which tensors are done and
their checksums (`recorded`: name -> the checksum of the tensor's bytes in row-major order, a
BLAKE3-named digest (dist_svc.storage.checksum), the same for every layout).

The formats a merge can write are registered here (`FORMATS`), each with its name, the options
it takes (checked here, for the config, `convert` and the CLI alike) and the suffix that names it
in OUT_DIR. To add a layout: one module implementing `OutputLayout` (and a `UnitWriter`), one
line in `FORMATS`, and a row in docs/storage.md; `tests/contracts.py: OutputLayoutContract`
checks it. docs/extending.md.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, Protocol, Sequence

from dist_svc.errors import DistSvcError

Entry = tuple[str, str, tuple[int, ...]]  # (tensor name, safetensors dtype code, shape)

DEFAULT_SHARD_BYTES = 5 * 10**9  # as transformers' and mergekit's default of "5GB"


@dataclass(frozen=True)
class Option:
    """An option of `output:` (and of `convert`): the name the layout reads it under (and the
    fingerprint records), its default, and how a written value is read (`read` raises
    ValueError or DistSvcError saying what is wrong)."""

    key: str
    default: Any
    read: Callable[[Any], Any]


def _choice(*values: str) -> Callable[[Any], str]:
    def read(value: Any) -> str:
        if value not in values:
            from dist_svc.methods.base import show

            raise ValueError(f"{show(value)} is not one of: {', '.join(values)}")
        return value

    return read


def _size(value: Any) -> int:
    from dist_svc.config import parse_size

    return parse_size(value)


SHARD_SIZE = Option("shard_bytes", DEFAULT_SHARD_BYTES, _size)  # the largest shard, e.g. 5GB
COMPRESSIONS = ("none", "zstd")  # of zarr chunks; `convert --compression` offers the same
COMPRESSION = Option("compression", "none", _choice(*COMPRESSIONS))


@dataclass(frozen=True)
class OutputFormat:
    """An output format: `layout` names its `OutputLayout` as "module:class" (imported only
    when the format is used; None for a format written by a pipeline of its own), `options`
    the `output:` options it takes, `suffix` what an OUT_DIR name ending in it means when
    neither the config nor the command line names a format, `marker` a file that makes an
    existing directory one of its outputs."""

    name: str
    layout: str | None
    options: Mapping[str, Option] = field(default_factory=dict)
    suffix: str | None = None
    marker: str | None = None
    # A format without a layout is written by a pipeline of its own, "module:function" called as
    # `function(config, out_dir, log)` in place of the units' run, returning the merge's report.
    pipeline: str | None = None

    def read_options(self, given: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """The options `given` (by `output:` name) as the layout reads them (by its key; those
        not given are left out: `layout_options` adds their defaults), and the problems found,
        as (option, message): a value its option refuses, or an option of another format set
        to anything but its default."""
        options, problems = {}, []
        for name, value in given.items():
            option = self.options.get(name) or all_options()[name]
            try:
                value = option.read(value)
            except (ValueError, DistSvcError) as e:
                problems.append((name, f"{str(e).rstrip('.')}."))
                continue
            if name not in self.options and value != option.default:
                takers = [f.name for f in FORMATS.values() if name in f.options and _takes(f.options[name], value)]
                problems.append((name, f"only {' and '.join(takers)} output takes {name}; {self.name} does not "
                                       f"(drop it, or write {takers[0]} output)."))
            elif name in self.options:
                options[option.key] = value
        return options, problems

    def layout_options(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Every option of this format under its layout's key, `values` over the defaults."""
        return {o.key: values.get(o.key, o.default) for o in self.options.values()}


def _takes(option: Option, value: Any) -> bool:
    try:
        option.read(value)
        return True
    except (ValueError, DistSvcError):
        return False


# Every output format, by name. A line here makes a layout valid in `output: {format: ...}`,
# in `--output-format` and in `convert --format` (a format with a layout), and its options
# valid in `output:`.
FORMATS: dict[str, OutputFormat] = {f.name: f for f in (
    OutputFormat("safetensors", "dist_svc.storage.safetensors_output:SafetensorsLayout", {"shard_size": SHARD_SIZE}),
    OutputFormat("zarr", "dist_svc.storage.zarr_output:ZarrLayout", {"compression": COMPRESSION}, suffix=".zarr",
                 marker="zarr.json"),
    # LoRA adapters of the base merged as one PEFT adapter (dist_svc.lowrank): not a layout. Its
    # adapter file is not compressed; the option stays declared because the fingerprint records it.
    OutputFormat("peft", None, {"compression": Option("compression", "none", _choice("none"))},
                 pipeline="dist_svc.lowrank:merge_adapters"),
)}
DEFAULT_FORMAT = "safetensors"


def all_options() -> dict[str, Option]:
    """Every option some format takes, by `output:` name (the first format to declare a name
    defines it)."""
    out: dict[str, Option] = {}
    for f in FORMATS.values():
        for name, option in f.options.items():
            out.setdefault(name, option)
    return out


def format_names(convertible: bool = False) -> list[str]:
    """The output formats a merge can write (`convertible`: those `convert` can write, the
    layouts), for the CLI's choices and the config's validation."""
    return [name for name, f in FORMATS.items() if f.layout is not None or not convertible]


def format_of(path: str | Path) -> str | None:
    """The format OUT_DIR's name (or, for an existing directory, its marker file) says, if any."""
    text = str(path).rstrip("/")
    for f in FORMATS.values():
        if (f.suffix and text.endswith(f.suffix)) or (f.marker and (Path(text) / f.marker).is_file()):
            return f.name
    return None


class UnitWriter(Protocol):
    """One tensor's bytes, in row-major order, arriving in pieces; hashed on the way. A writer
    with `columns` also takes a matrix as ranges of its columns in any order (`write_columns`,
    each range's rows x width elements row-major), hashing the whole once complete: a wide
    calibrated matrix is produced by columns, and is then never assembled in memory."""

    columns: bool
    seconds: dict[str, float]  # time spent so far: "checksum" and "write"

    def write(self, data) -> None: ...

    def write_columns(self, start: int, stop: int, data) -> None: ...

    def close(self) -> str:
        """The tensor is complete: make it durable (if the writer syncs) and return its checksum
        (dist_svc.storage.checksum)."""

    def abort(self) -> None: ...


class OutputLayout(Protocol):
    format: ClassVar[str]
    out_dir: Path | str  # OUT_DIR as the run names it: a Path if local, else its URL (`OutputDir.named`)

    def prepare(self, recorded: Mapping[str, str]) -> list[str]:
        """Before any worker writes (driver only): create what writers need, and bring what an
        earlier run left in line with `recorded`. Returns the recorded tensors whose bytes are
        gone or not what was recorded: they must be run again."""

    def writer(self, name: str, sync: bool) -> UnitWriter:
        """Where one tensor's bytes go (any process). With `sync=False` the caller must call
        `make_durable` before it records the tensor."""

    def make_durable(self, names: Iterable[str]) -> None: ...

    def stored_checksum(self, name: str) -> str | None:
        """The checksum of a tensor's bytes as stored now (None: unreadable or missing)."""

    def on_recorded(self, name: str) -> bool:
        """A tensor was recorded (O(1) bookkeeping). True when it completes something `seal`
        can seal; the driver then saves the manifest and calls `seal`."""

    def seal(self, recorded: Mapping[str, str], fresh: set[str]) -> list[str]:
        """Seal everything complete and not yet sealed (also what a killed run left unsealed):
        a shard becomes visible under its final name, or nothing. Tensors in `fresh` were hashed
        as they were written in this run and need no re-reading. Returns recorded tensors found
        damaged: they must be run again."""

    def finish(self, recorded: Mapping[str, str], side_files: Mapping[str, bytes]) -> None:
        """Every tensor is recorded and sealed: write what completes the output (index, config
        and tokenizer files), durably."""

    def problems(self, recorded: Mapping[str, str], side_files: Mapping[str, str], deep: bool) -> list[str]:
        """What keeps the output from being present and whole, one line each (empty: whole).
        `side_files` maps each side file to the sha256 it was written with. `deep` re-reads
        every tensor and side file against its checksum (verify); otherwise sizes and presence
        only (what a rerun checks before it says "already complete")."""

    def stamps(self, side_files: Iterable[str]) -> dict[str, str]:
        """What identifies the output's files as they are now, without reading their bytes
        (locally each file's size and mtime_ns, on object storage its size and ETag), keyed by
        file or group of files. Recorded when the merge completes; a rerun that finds a stamp
        changed does not believe "complete" (see `damaged`)."""

    def damaged(self, recorded: Mapping[str, str], changed: Iterable[str]) -> list[str]:
        """Recorded tensors stored in the files of the `changed` stamps whose bytes no longer
        match their checksums (re-read): they must be run again."""

    def state(self) -> list[str]:
        """Layout-specific progress lines for `status` (e.g. shards sealed)."""


def layout_for(fmt: str, out_dir: Path, entries: Sequence[Entry], options: Mapping) -> OutputLayout:
    """The layout of format `fmt` for these tensors in OUT_DIR. `options` are the output spec's
    (`OutputFormat.layout_options`: shard size, compression)."""
    module, cls = FORMATS[fmt].layout.split(":")
    return getattr(importlib.import_module(module), cls)(out_dir, entries, options)


def source_files(base) -> dict[str, bytes]:
    """The base checkpoint's config and tokenizer files, as stored."""
    from dist_svc.storage.types import SIDE_FILES

    return {name: data for name in SIDE_FILES if (data := base.side_file(name)) is not None}


def side_files(base, out_dtype: str | None) -> dict[str, bytes]:
    """The base's side files as the output gets them: `config.json` names the output dtype (a
    torch dtype name such as "bfloat16") when one was chosen."""
    return {name: _with_dtype(data, out_dtype) if name == "config.json" and out_dtype else data
            for name, data in source_files(base).items()}


def _with_dtype(config_bytes: bytes, dtype: str) -> bytes:
    try:
        config = json.loads(config_bytes)
    except ValueError:
        return config_bytes  # not ours to repair; copied as is
    if not isinstance(config, dict):
        return config_bytes
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = dtype
    return (json.dumps(config, indent=2) + "\n").encode()


def side_file_problems(out_dir, side_files: Mapping[str, str], deep: bool) -> list[str]:
    """Side files of an output (a local path, a URL or an `OutputDir`) that are missing or
    (`deep`) not as written."""
    from dist_svc.storage.outdir import output_dir

    folder = output_dir(out_dir)
    out = []
    for name, digest in side_files.items():
        if (folder.size(name) if not deep else 0) is None:
            out.append(f"{folder.where(name)}: missing")
        elif deep:
            data = folder.read(name)
            if data is None:
                out.append(f"{folder.where(name)}: missing")
            elif hashlib.sha256(data).hexdigest() != digest:
                out.append(f"{folder.where(name)}: not the file the merge wrote (changed since)")
    return out
