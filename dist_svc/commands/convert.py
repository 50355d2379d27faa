"""`dist-svc convert`: a checkpoint from one layout to another (safetensors <-> zarr v3).

Tensors are streamed in row blocks (never a whole checkpoint in memory) through the output
layout's writers, hashed on the way in, and every tensor is read back from the destination and
compared with that hash before the result appears: the output is built under a temporary name
next to DST and renamed into place at the end, so DST is either absent or complete, and an
existing DST is never touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import click

from dist_svc.errors import DistSvcError
from dist_svc.progress import Progress, human_bytes
from dist_svc.storage import open_checkpoint, read_blocks, source_of
from dist_svc.storage.checksum import ALGORITHM, Hasher, algorithm_of
from dist_svc.storage.location import is_url
from dist_svc.storage.durable import staged_directory
from dist_svc.storage.output import COMPRESSIONS, DEFAULT_FORMAT, DEFAULT_SHARD_BYTES, FORMATS, format_names, format_of, \
    layout_for, source_files
from dist_svc.storage.types import tensor_bytes


def convert(src: str | Path, dst: str | Path, fmt: str | None = None, compression: str = "none",
            shard_size: int = DEFAULT_SHARD_BYTES, progress: str = "auto", trust_pickle: bool = False,
            log: Callable[[str], None] = lambda s: None) -> dict:
    """Convert checkpoint `src` (any source: a local path, a URL, a Hub ID, BASE+ADAPTER, a .bin
    state dict) into `dst` in format `fmt`, a layout of dist_svc.storage.output's FORMATS
    ("zarr" or "safetensors"; by default the one `dst`'s name says: zarr for .zarr).
    `trust_pickle` loads a .bin/.pt whose pickle needs code (running it). Returns {"tensors",
    "bytes", "format"}."""
    if isinstance(dst, str) and is_url(dst):
        raise DistSvcError(f"{dst}: convert writes a local DST (it renames it into place when complete); convert to "
                           f"a local directory and upload it, or merge straight to s3://.")
    dst = Path(dst).expanduser().resolve()
    fmt = fmt or format_of(dst) or DEFAULT_FORMAT
    options = _options(fmt, {"compression": compression, "shard_size": shard_size})
    if dst.exists():
        raise DistSvcError(f"{dst} already exists; dist-svc never overwrites. Choose a new destination or remove it.")
    src = source_of(src) if isinstance(src, str) else Path(src).expanduser().resolve()
    if isinstance(src, Path) and dst.is_relative_to(src):
        raise DistSvcError(f"{dst} is inside the checkpoint being converted ({src}); write it elsewhere.")
    source = open_checkpoint(src, trust_pickle=trust_pickle)
    recorded_before = _recorded_checksums(src) if isinstance(src, Path) and src.is_dir() else {}
    names = source.order()
    total = sum(info.nbytes for info in source.tensors.values())
    bar = Progress(total, len(names), mode=progress)
    try:
        with staged_directory(dst, "converting") as tmp:
            _copy(source, src, dst, tmp, fmt, names, recorded_before, options, bar)
    finally:
        bar.close()
        source.close()
    log(f"converted {len(names)} tensors ({total} bytes) into {dst} ({fmt}), every tensor verified")
    return {"tensors": len(names), "bytes": total, "format": fmt}


def _copy(source, src, dst: Path, tmp: Path, fmt: str, names: list[str], recorded_before: dict[str, str],
          options: dict, bar: Progress) -> None:
    """Every tensor of `source` into `tmp` in format `fmt`, each checked against the checksum
    its source records (if any) and read back."""
    entries = [(n, source.tensors[n].dtype, source.tensors[n].shape) for n in names]
    layout = layout_for(fmt, tmp, entries, options)
    layout.prepare({})
    recorded: dict[str, str] = {}
    for name in names:
        expected = recorded_before.get(name) or source.checksum(name)
        # a source that recorded another algorithm's checksum is checked with that one too
        other = Hasher(algorithm_of(expected)) if expected and algorithm_of(expected) != ALGORITHM else None
        writer = layout.writer(name, sync=True)
        for block in read_blocks(source, name):
            data = tensor_bytes(block)
            writer.write(data)
            if other is not None:
                other.update(data)
        digest = writer.close()  # the checksum of the bytes read from the source
        if expected is not None and (other.digest() if other is not None else digest) != expected:
            raise DistSvcError(f"{src}: tensor '{name}' does not match the checksum its checkpoint records "
                               f"(the source is damaged or was changed); nothing was written to {dst}. "
                               f"Repair or re-create the source.")
        if layout.stored_checksum(name) != digest:
            raise DistSvcError(f"{tmp}: tensor '{name}' reads back differently from what was written; "
                               f"the destination storage is not reliable.")
        recorded[name] = digest
        if layout.on_recorded(name):
            layout.seal(recorded, fresh=set(recorded))  # every tensor verified just now
        bar.advance(source.tensors[name].nbytes)
    layout.finish(recorded, source_files(source))


def _options(fmt: str, given: dict) -> dict:
    """The layout options of format `fmt` from convert's options, checked by the format."""
    if fmt not in format_names(convertible=True):
        raise DistSvcError(f"unknown output format '{fmt}' for convert; use one of: "
                           f"{', '.join(format_names(convertible=True))}.")
    out = FORMATS[fmt]
    values, problems = out.read_options(given)
    if problems:
        raise DistSvcError("; ".join(f"--{name.replace('_', '-')}: {message}" for name, message in problems))
    return out.layout_options(values)


def _recorded_checksums(src: Path) -> dict[str, str]:
    """A finished merge output's checksums, from its manifest (empty for other checkpoints)."""
    from dist_svc.manifest import Manifest
    from dist_svc.storage.types import MANIFEST_NAME

    if not (src / MANIFEST_NAME).is_file():
        return {}
    try:
        return dict(Manifest.load(src).recorded)
    except DistSvcError:  # a manifest of an earlier format: the tensors' own checksums, if any, are checked
        return {}


@click.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--format", "fmt", type=click.Choice(format_names(convertible=True)), default=None,
              help="Layout of DST (default: zarr when DST ends in .zarr, else safetensors).")
@click.option("--compression", type=click.Choice(COMPRESSIONS), default="none", show_default=True,
              help="zarr output: compress chunks with zstd.")
@click.option("--shard-size", default="5GB", show_default=True,
              help="safetensors output: largest shard, e.g. 5GB.")
@click.option("--progress", type=click.Choice(["auto", "bar", "log", "off"]), default="auto", show_default=True)
@click.option("--trust-pickle", is_flag=True,
              help="Load a .bin/.pt checkpoint whose pickle needs code (a class of the program that saved it). "
                   "This RUNS that code: only for files you trust. Merges never do.")
def convert_command(src: str, dst: str, fmt: str | None, compression: str, shard_size: str, progress: str,
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
    from dist_svc.config import parse_size

    result = convert(src, dst, fmt=fmt, compression=compression, shard_size=parse_size(shard_size),
                         progress=progress, trust_pickle=trust_pickle)
    click.echo(f"{dst}: {result['tensors']} tensors, {human_bytes(result['bytes'])}, {result['format']}; "
               f"every tensor read back and verified.")
