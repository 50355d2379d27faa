"""Storage: checkpoints in (one `Checkpoint` interface, `open_checkpoint`) and merged outputs
out (one `OutputLayout` interface, dist_svc.storage.output).

`source_of` is the edge: it turns what a config says into a checkpoint source (a local `Path`,
or a string for everything else), and `open_checkpoint` is the one place that turns a source
into a reader:

    where:  a local path | hf://org/name[@rev] or org/name[@rev] (the Hub cache) |
            s3://, gs://, ... (object storage, through fsspec) | MODEL+ADAPTER (mergekit's syntax)
    what:   zarr v3 | safetensors | a PEFT LoRA adapter | legacy .bin/.pt
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping

if TYPE_CHECKING:
    import torch

    from dist_svc.storage.location import Location
    from dist_svc.storage.types import Checkpoint

BLOCK_BYTES = 64 << 20  # what `read_blocks` reads at once


def source_of(text: str) -> Path | str:
    """A model as a config names it, made a source: a local path becomes an absolute `Path`
    (taken relative to the working directory, as mergekit does); a URL (`s3://...`), a Hub ID
    (`org/name[@rev]`, written `hf://org/name[@rev]`) and mergekit's `MODEL+ADAPTER` stay
    strings, each side made a source."""
    from dist_svc.storage import hub
    from dist_svc.storage.location import is_url

    local = Path(text).expanduser()
    if "+" in text and not local.exists():
        model, adapter = text.split("+", 1)
        return f"{source_of(model)}+{source_of(adapter)}"
    if is_url(text) or text.startswith(hub.PREFIX):
        return text.rstrip("/")
    if hub.is_hub_id(text):
        return hub.canonical(text)
    from dist_svc.storage.durable import local_path

    return local_path(text)


def open_checkpoint(source: "str | Path | Location", base: "Checkpoint | None" = None,
                    pins: "Mapping[str, str] | None" = None,
                    trust_pickle: bool = False, identity_only: bool = False) -> "Checkpoint":
    """The reader for a checkpoint source (see `source_of`). A PEFT adapter named alone applies to
    `base` (the merge's base model); `MODEL+ADAPTER` applies to MODEL (`base` itself when MODEL
    is the base). `pins`: the commit each Hub model must be read at (the plan's, `hub.pins`). The output of a
    dist-svc merge that has not finished is refused, whatever its format: some of its tensors
    are not written yet. With `identity_only`, a reader may skip what `identity()` and
    `side_file()` do not need (a rerun of a finished merge checks only those)."""
    from dist_svc.errors import DistSvcError
    from dist_svc.storage import hub
    from dist_svc.storage.location import LocalLocation, location

    text = str(source)
    if isinstance(source, str) and "+" in text and not Path(text).exists():
        model, adapter = text.split("+", 1)
        inner = base if base is not None and model == base.source else \
            open_checkpoint(model, pins=pins, identity_only=identity_only)
        return open_checkpoint(adapter, base=inner, pins=pins)

    extra = None
    if isinstance(source, str) and hub.is_hub_id(text):
        folder, extra = hub.resolve(text, pins)
        loc = LocalLocation(folder)
    else:
        loc = location(source)
    refuse_unfinished_merge(loc)
    kind = checkpoint_format(loc)
    if kind == "zarr":
        from dist_svc.storage.zarr_reader import ZarrCheckpoint

        return ZarrCheckpoint(text, loc, source=text, extra_identity=extra)
    if kind == "peft":
        from dist_svc.storage.lora_reader import WEIGHT_FILES, LoraCheckpoint

        if base is None:
            raise DistSvcError(f"{loc} is a PEFT adapter, which changes a base model: name it as a model of a merge "
                               f"(it then applies to the merge's base_model), or as BASE+{text}.")
        weights_file = next((f for f in WEIGHT_FILES if loc.is_file(f)), None)
        if weights_file is None:
            raise DistSvcError(f"{loc}: a PEFT adapter config without its weights ({' or '.join(WEIGHT_FILES)}).")
        weights = open_checkpoint(loc.child(weights_file), identity_only=identity_only)
        return LoraCheckpoint(loc, base, weights, source=text, extra_identity=extra, identity_only=identity_only)
    if kind == "torch":
        from dist_svc.storage.torch_reader import TorchCheckpoint

        return TorchCheckpoint(text, loc, source=text, extra_identity=extra, trust_pickle=trust_pickle)
    from dist_svc.storage.safetensors_reader import SafetensorsCheckpoint

    return SafetensorsCheckpoint(text, loc, source=text, extra_identity=extra, identity_only=identity_only)


def checkpoint_format(loc) -> str:
    """zarr, peft, torch or safetensors, from the names at a location (nothing is read)."""
    from dist_svc.storage.torch_reader import INDEX_NAME as TORCH_INDEX, SUFFIXES as TORCH_SUFFIXES

    url = str(loc).rstrip("/")
    if loc.is_dir():
        names = set(loc.names())
        if "zarr.json" in names:
            return "zarr"
        if "adapter_config.json" in names:
            return "peft"
        if not any(n.endswith(".safetensors") for n in names) and (
                TORCH_INDEX in names or any(n.endswith(TORCH_SUFFIXES) for n in names)):
            return "torch"
        return "zarr" if url.endswith(".zarr") else "safetensors"
    if url.endswith(".zarr"):
        return "zarr"
    return "torch" if url.endswith(TORCH_SUFFIXES) else "safetensors"


def refuse_unfinished_merge(loc) -> None:
    import json

    from dist_svc.errors import DistSvcError
    from dist_svc.storage.types import MANIFEST_NAME

    if not loc.is_dir():
        return
    partials = [n for n in loc.names() if n.endswith(".partial")]
    raw = loc.read_bytes(MANIFEST_NAME)
    if raw is None and not partials:
        return
    try:
        complete = json.loads(raw).get("complete") is True
    except (TypeError, ValueError, AttributeError, RecursionError):
        complete = False
    if not complete or partials:
        raise DistSvcError(f"{loc} is a dist-svc merge that has not finished (its manifest does not say complete"
                           f"{f', and {partials[0]} is still being written' if partials else ''}); some tensors "
                           f"are not written yet. Finish it first by rerunning its `dist-svc merge` command.")


def read_blocks(checkpoint: "Checkpoint", name: str, block_bytes: int = BLOCK_BYTES) -> Iterator["torch.Tensor"]:
    """A tensor's rows in blocks of about `block_bytes`, in its stored dtype: a whole tensor
    read without holding it (what `convert` copies, what the plan compares)."""
    import math

    from dist_svc.storage.types import ITEMSIZE

    info = checkpoint.tensors[name]
    if not info.shape:
        yield checkpoint.read(name)
        return
    step = max(1, block_bytes // max(1, math.prod(info.shape[1:]) * ITEMSIZE[info.dtype]))
    for r0 in range(0, info.shape[0], step):
        yield checkpoint.read(name, rows=slice(r0, r0 + step))
