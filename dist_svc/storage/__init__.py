"""Storage: checkpoints in (one `Checkpoint` interface, `open_checkpoint`) and merged outputs
out (one `OutputLayout` interface, dist_svc.storage.output)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dist_svc.storage.types import Checkpoint


def open_checkpoint(path: str | Path, identity_only: bool = False) -> "Checkpoint":
    """The reader for a checkpoint: a zarr v3 store, else Hugging Face safetensors. The output
    of a dist-svc merge that has not finished is refused, whatever its format: some of its
    tensors are not written yet. With `identity_only`, a reader may skip what `identity()` and
    `side_file()` do not need (a rerun of a finished merge checks only those)."""
    from dist_svc.storage.zarr_format import is_zarr

    refuse_unfinished_merge(Path(path))

    if is_zarr(path):
        from dist_svc.storage.zarr_reader import ZarrCheckpoint

        return ZarrCheckpoint(path)
    from dist_svc.storage.safetensors_reader import SafetensorsCheckpoint

    return SafetensorsCheckpoint(path, identity_only)


def refuse_unfinished_merge(path: Path) -> None:
    import json

    from dist_svc.errors import DistSvcError
    from dist_svc.storage.types import MANIFEST_NAME

    manifest = path / MANIFEST_NAME
    partials = sorted(path.glob("*.partial")) if path.is_dir() else []
    if not manifest.is_file() and not partials:
        return
    try:
        complete = json.loads(manifest.read_bytes()).get("complete") is True
    except (OSError, ValueError, AttributeError, RecursionError):
        complete = False
    if not complete or partials:
        raise DistSvcError(f"{path} is a dist-svc merge that has not finished (its manifest does not say complete"
                           f"{f', and {partials[0].name} is still being written' if partials else ''}); some tensors "
                           f"are not written yet. Finish it first by rerunning its `dist-svc merge` command.")
