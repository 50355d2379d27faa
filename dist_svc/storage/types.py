"""The vocabulary every checkpoint and output layout shares: dtypes, tensor metadata, the
`Checkpoint` interface a reader implements, and a tensor's bytes as both layouts store them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, runtime_checkable

import torch

# Floating-point dtypes that can be merged (safetensors codes), with their torch dtype and size.
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
}
TORCH_TO_ST = {torch_dtype: code for code, (torch_dtype, _) in DTYPES.items()}
NAME_TO_ST = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
ST_TO_NAME = {code: name for name, code in NAME_TO_ST.items()}
INDEX_NAME = "model.safetensors.index.json"  # a sharded Hugging Face checkpoint's index
MANIFEST_NAME = "dist-svc-manifest.json"  # a merge output's record of itself (dist_svc.manifest)
# Files of a checkpoint that belong with its weights: copied from the base into the output.
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
)


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as its checkpoint describes it, before any of its data is read."""

    name: str
    dtype: str  # safetensors code: F32, BF16, ...
    shape: tuple[int, ...]
    where: str  # the file or array that holds it, for messages

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * DTYPES[dtype][1]


@runtime_checkable
class Checkpoint(Protocol):
    """One model's tensors, wherever and however they are stored.

    Everything but `read` comes from metadata alone, so that planning reads no tensor data.
    `read` returns the tensor, or a range of its rows and/or columns, in its stored dtype, in
    memory of its own (changing it changes nothing else). Contract tests: `tests/contracts.py`.
    """

    source: str  # what the user named (a path or URL), for messages
    tensors: Mapping[str, TensorInfo]

    def order(self) -> list[str]:
        """Tensor names in the checkpoint's own order (the output is laid out in it)."""

    def identity(self) -> Any:
        """JSON-able facts that change when the stored tensors change (part of the fingerprint)."""

    def chunk_extent(self, name: str, axis: int) -> int:
        """Rows (axis 0) or columns (axis 1) per stored chunk; blocks aligned to it read each once."""

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor: ...

    def side_file(self, name: str) -> bytes | None:
        """A non-tensor file of the checkpoint (config.json, tokenizer files), or None."""

    def checksum(self, name: str) -> str | None:
        """The sha256 of the tensor's bytes (row-major, stored dtype) if the checkpoint records
        one (a store dist-svc completed), else None."""

    def close(self) -> None: ...


@runtime_checkable
class Adapter(Protocol):
    """A checkpoint stored as a change of another one (`inner`), such as a LoRA adapter: the
    change of any block is known exactly, without forming the changed weights."""

    inner: Checkpoint

    def delta(self, name: str, rows: slice | None, cols: slice | None, dtype: torch.dtype) -> torch.Tensor | None:
        """The block's change from `inner` in `dtype` (zeros where nothing changes), or None when
        the tensor is replaced whole (its change is then `read() - inner`)."""


def natural_key(name: str) -> list:
    """Sort key with numbers compared as numbers, so layers stay together and in order."""
    parts = []
    for piece in name.replace(".", " . ").split():
        parts.append((0, int(piece), "") if piece.isdigit() else (1, 0, piece))
    return parts


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's raw bytes in row-major order, as both layouts store them (on the CPU)."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
    return memoryview(flat.numpy())
