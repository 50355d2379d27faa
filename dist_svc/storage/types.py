"""The vocabulary every checkpoint and output layout shares: dtypes, tensor metadata, the
`Checkpoint` interface a reader implements, and a tensor's bytes as both layouts store them."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

# Every dtype a tensor may have (safetensors codes) and its size in bytes. Floating-point ones
# (`FLOATS`) are merged; integer and bool ones (position ids, masks, counters: a model's buffers)
# are copied byte for byte from one input (dist_svc.plan). Their torch dtypes are `DTYPES`
# (code -> (torch dtype, size)) and `TORCH_TO_ST`, made on first use: what only plans, checks or
# reports (`status`, `verify`) never imports torch.
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOATS = frozenset({"F64", "F32", "F16", "BF16"})
ST_TO_NAME = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
              "U8": "uint8", "BOOL": "bool"}
NAME_TO_ST = {name: code for code, name in ST_TO_NAME.items()}
UNSUPPORTED = "it merges float64, float32, float16 and bfloat16 tensors and copies integer and bool ones"
INDEX_NAME = "model.safetensors.index.json"  # a sharded Hugging Face checkpoint's index
MANIFEST_NAME = "dist-svc-manifest.json"  # a merge output's record of itself (dist_svc.manifest)
# A checkpoint's tokenizer files (what --no-copy-tokenizer leaves out): the fast tokenizer's,
# its settings and chat template, and every vocabulary file transformers' tokenizers read
# (their `vocab_files_names`: BERT's vocab.txt, T5's spiece.model, Marian's source.spm, ...),
# which a tokenizer without tokenizer.json needs to load (without them it loads, empty).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
    "sentencepiece.model", "spm.model", "spm_char.model", "bpe.codes", "source.spm", "target.spm",
    "vocab-src.json", "vocab-tgt.json", "target_vocab.json", "entity_vocab.json", "dict.txt", "emoji.json",
    "normalizer.json", "prophetnet.tokenizer", "byte_maps.json", "word_shape.json", "word_pronunciation.json",
)
# Files of a checkpoint that belong with its weights: copied from the base into the output.
SIDE_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", *TOKENIZER_FILES)


class TensorInfo(NamedTuple):
    """A tensor as its checkpoint describes it, before any of its data is read (a tuple: a
    checkpoint may describe tens of thousands)."""

    name: str
    dtype: str  # safetensors code: F32, BF16, ...
    shape: tuple[int, ...]
    where: str  # the file or array that holds it, for messages

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * ITEMSIZE[dtype]


def is_float(dtype: str) -> bool:
    """Whether a tensor of this dtype is merged (else it is a buffer, copied: dist_svc.plan)."""
    return dtype in FLOATS


def __getattr__(name: str):
    if name in ("DTYPES", "TORCH_TO_ST"):
        import torch

        dtypes = {code: (getattr(torch, ST_TO_NAME[code]), size) for code, size in ITEMSIZE.items()}
        globals().update(DTYPES=dtypes, TORCH_TO_ST={t: code for code, (t, _) in dtypes.items()})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        """The checksum of the tensor's bytes (row-major, stored dtype; dist_svc.storage.checksum)
        if the checkpoint records one (a store dist-svc completed), else None."""

    def close(self) -> None: ...


@runtime_checkable
class Adapter(Protocol):
    """A checkpoint stored as a change of another one (`inner`), such as a LoRA adapter: the
    change of any block is known exactly, without forming the changed weights."""

    inner: Checkpoint

    def delta(self, name: str, rows: slice | None, cols: slice | None, dtype: torch.dtype) -> torch.Tensor | None:
        """The block's change from `inner` in `dtype` (zeros where nothing changes), or None when
        the tensor is replaced whole (its change is then `read() - inner`)."""


_PIECES = re.compile(r"\.|[^.\s]+")


def natural_key(name: str) -> list:
    """Sort key with numbers compared as numbers, so layers stay together and in order: the
    name's pieces between dots (and the dots), a piece of digits before any other."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in _PIECES.findall(name)]


def tensor_bytes(tensor: "torch.Tensor") -> memoryview:
    """A tensor's raw bytes in row-major order, as both layouts store them (on the CPU)."""
    import torch

    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
    return memoryview(flat.numpy())
