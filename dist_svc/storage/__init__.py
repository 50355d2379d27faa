"""Checkpoint storage: safetensors (Hugging Face layout) and zarr v3, behind one reader interface."""

from __future__ import annotations

from pathlib import Path

import torch


def open_checkpoint(path: str | Path):
    """A `ZarrCheckpoint` for a zarr store, else a `SafetensorsCheckpoint`: both give `tensors`
    (from metadata alone), `read(name, rows=, cols=)`, `identity()` and `close()`."""
    from dist_svc.storage.zarr_store import ZarrCheckpoint, is_zarr

    if is_zarr(path):
        return ZarrCheckpoint(path)
    from dist_svc.storage.safetensors_reader import SafetensorsCheckpoint

    return SafetensorsCheckpoint(path)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's raw bytes in row-major order, as both layouts store them (on the CPU)."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
    return memoryview(flat.numpy())
