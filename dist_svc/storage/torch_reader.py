"""Legacy PyTorch checkpoints: `pytorch_model.bin` (or `*.pt`, `*.pth`), single or sharded with
`pytorch_model.bin.index.json`, read without executing any code.

Each file is loaded with `torch.load(weights_only=True, mmap=True)`: the restricted unpickler
builds tensors and plain containers only, and the tensors' bytes stay in the file, mapped, until
a slice is copied out. A file whose pickle needs anything more (a class of the program that
saved it) is refused by name, with the `dist-svc convert --trust-pickle` way out for files the
user trusts. Local files only: a legacy checkpoint on object storage is converted once instead.

Unlike the safetensors reader, pages of a mapped file that were read stay counted in the
process's resident memory until the reader is closed (they are clean file pages the kernel can
drop); convert large legacy checkpoints to safetensors once for merges that run often.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile

import torch

from dist_svc.errors import DistSvcError
from dist_svc.storage.location import check_index, discover, quote, side_file
from dist_svc.storage.types import TORCH_TO_ST, UNSUPPORTED, TensorInfo, natural_key

INDEX_NAME = "pytorch_model.bin.index.json"
SUFFIXES = (".bin", ".pt", ".pth")
WRAPPERS = ("state_dict", "model", "module")  # training checkpoints that hold the weights one level down


class TorchCheckpoint:
    """A state dict saved by `torch.save`, read with the restricted unpickler."""

    def __init__(self, path, loc, source: str | None = None, extra_identity: dict | None = None,
                 trust_pickle: bool = False):
        self.loc = loc
        self.source = source or str(path)
        self.path = loc.path
        if not loc.is_local:
            raise DistSvcError(f"{loc}: a legacy PyTorch checkpoint (.bin/.pt) is read from local files only. "
                               f"Copy it to a local directory and convert it once (`dist-svc convert DIR "
                               f"DIR-safetensors`); safetensors and zarr are read from object storage directly.")
        self.trust_pickle = trust_pickle
        names, weight_map = discover(loc, INDEX_NAME, "pytorch_model.bin", SUFFIXES, "PyTorch (.bin/.pt)")
        self.files = [loc.file(n) for n in names]
        self.tensors: dict[str, TensorInfo] = {}
        self._holder: dict[str, int] = {}  # tensor -> index in self.files
        self._identity = [extra_identity] if extra_identity else []
        self._loaded: dict[int, dict[str, torch.Tensor]] = {}
        for i, file in enumerate(self.files):
            state = self._load(i)
            self._identity.append({**file.identity(), "pickle_sha256": _pickle_sha256(file.path)})
            for name, tensor in state.items():
                if name in self.tensors:
                    raise DistSvcError(f"{loc}: tensor {quote(name)} is stored twice "
                                       f"({self.files[self._holder[name]].name} and {file.name}).")
                self.tensors[name] = TensorInfo(name, TORCH_TO_ST[tensor.dtype], tuple(tensor.shape), file.where)
                self._holder[name] = i
        check_index(weight_map, {n: self.files[i].name for n, i in self._holder.items()}, loc.where(INDEX_NAME))

    def _load(self, i: int) -> dict[str, torch.Tensor]:
        if i in self._loaded:
            return self._loaded[i]
        file = self.files[i]
        try:
            try:
                state = torch.load(file.path, map_location="cpu", weights_only=not self.trust_pickle, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                # The pre-1.6 (not zip) format cannot be mapped: read whole, still restricted.
                state = torch.load(file.path, map_location="cpu", weights_only=not self.trust_pickle)
        except pickle.UnpicklingError as e:
            needed = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f"it needs {needed.group(1)}" if needed else str(e).splitlines()[0][:200]
            raise DistSvcError(
                f"{file.where}: this pickle needs code to load ({what}); dist-svc never runs code from a "
                f"checkpoint. If you trust the file, convert it to safetensors once with `dist-svc convert "
                f"{self.source} DST --trust-pickle` (that runs the pickle's code) and merge DST instead.") from None
        except (OSError, EOFError, RuntimeError, ValueError, zipfile.BadZipFile) as e:
            raise DistSvcError(f"{file.where}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                               f"{str(e)[:200]}); the file is truncated or corrupt. Re-download or re-save it.") from None
        state = _state_dict(state, file.where)
        self._loaded[i] = state
        return state

    def chunk_extent(self, name: str, axis: int) -> int:
        return 1

    def order(self) -> list[str]:
        """File by file, in natural order within a file (as the safetensors reader)."""
        return sorted(self.tensors, key=lambda n: (self._holder[n], natural_key(n)))

    def identity(self) -> list[dict]:
        """Each file's name, size, modification time and the sha256 of its pickle (which names
        every tensor, its dtype, shape and place in the file)."""
        return list(self._identity)

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        tensor = self._load(self._holder[name])[name]
        if tensor.ndim:
            tensor = tensor[rows or slice(None)]
            if cols is not None:
                tensor = tensor[:, cols]
        # A copy of its own: the loaded tensor is a view of the mapped file.
        return torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor)

    def checksum(self, name: str) -> str | None:
        return None

    def side_file(self, name: str) -> bytes | None:
        return side_file(self.loc, name)

    def close(self) -> None:
        self._loaded.clear()  # the mappings go with the tensors


def _state_dict(state, where: str) -> dict[str, torch.Tensor]:
    """The tensors of what `torch.load` returned: a state dict, or one wrapped in a training
    checkpoint (`{"state_dict": ...}`). Anything else is named."""
    if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = [state[k] for k in WRAPPERS if isinstance(state.get(k), dict)]
        if len(inner) == 1:
            state = inner[0]
    if not isinstance(state, dict):
        raise DistSvcError(f"{where}: holds a {type(state).__name__}, not a state dict of tensors; save the "
                           f"model's state_dict(), or convert it to safetensors.")
    out = {}
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise DistSvcError(f"{where}: entry {quote(name)} is a {type(value).__name__}, not a tensor; the file "
                               f"is not a plain state dict. Save the model's state_dict(), or convert it.")
        if value.dtype not in TORCH_TO_ST:
            raise DistSvcError(f"{where}: tensor {quote(name)} has dtype {str(value.dtype).removeprefix('torch.')}, "
                               f"which dist-svc cannot read ({UNSUPPORTED}). Remove it from the checkpoint or "
                               f"convert it.")
        out[name] = value
    return out


def _pickle_sha256(path) -> str | None:
    """sha256 of the pickle inside a zip-format torch file (cheap: no tensor data), else None."""
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            return hashlib.sha256(z.read(pkl)).hexdigest() if pkl else None
    except (zipfile.BadZipFile, OSError):
        return None
