"""Storage: checkpoints in (one `Checkpoint` interface, `open_checkpoint`) and merged outputs
out (one `OutputLayout` interface, dist_svc.storage.output)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dist_svc.storage.types import Checkpoint


def open_checkpoint(path: str | Path) -> "Checkpoint":
    """The reader for a checkpoint: a zarr v3 store, else Hugging Face safetensors."""
    from dist_svc.storage.zarr_format import is_zarr

    if is_zarr(path):
        from dist_svc.storage.zarr_reader import ZarrCheckpoint

        return ZarrCheckpoint(path)
    from dist_svc.storage.safetensors_reader import SafetensorsCheckpoint

    return SafetensorsCheckpoint(path)
