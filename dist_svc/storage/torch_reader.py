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
import io
import pickle
import re
import zipfile
from dataclasses import dataclass

import torch
from torch.storage import _get_dtype_from_pickle_storage_type as _storage_dtype

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
        if not loc.file_paths:  # torch.load opens (and memory-maps) a file by its path
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
        mappable = _check_storages(file)
        try:
            state = torch.load(file.path, map_location="cpu", weights_only=not self.trust_pickle, mmap=mappable)
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


def _check_storages(file) -> bool:
    """Refuses, by file and tensor, a zip-format checkpoint whose stored data is shorter than one
    of its tensors needs: a mapped load takes the length the pickle declares, so it would fill the
    tensor with whatever bytes follow in the file. True when every storage can be mapped; False
    for the pre-1.6 (not zip) format and for compressed records, which are read whole (a map of a
    compressed record would be its compressed bytes)."""
    try:
        archive = zipfile.ZipFile(file.path)
    except (zipfile.BadZipFile, OSError):
        return False
    with archive:
        records = {info.filename: info for info in archive.infolist()}
        pkl = next((n for n in records if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            return False  # not a torch.save archive: torch.load says what it is
        prefix = pkl[: -len("data.pkl")]
        try:
            stored = _StorageScan(io.BytesIO(archive.read(pkl))).tensors()
        except Exception:  # a pickle this scan cannot follow: torch.load names what is wrong with it
            return False
    for name, t in stored:
        record = records.get(f"{prefix}data/{t.key}")
        held = record.file_size if record else 0
        if t.needs > min(held, t.storage_bytes):
            raise DistSvcError(
                f"{file.where}: tensor {quote(name)} (shape {list(t.size)}, storage offset {t.offset}, strides "
                f"{list(t.stride)}) needs {t.needs} bytes of its storage {quote('data/' + t.key)}, which declares "
                f"{t.storage_bytes} bytes and holds {held} in the file: the file is truncated or was rewritten, and "
                f"reading it would fill the tensor with other bytes. Re-download the checkpoint, or save it again "
                f"(torch.save(model.state_dict(), ...)).")
    return all(info.compress_type == zipfile.ZIP_STORED for n, info in records.items()
               if n.startswith(f"{prefix}data/"))


@dataclass(frozen=True)
class _Stored:
    """Where one tensor of a torch.save pickle lies in its storage (sizes in bytes)."""

    key: str
    storage_bytes: int
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    itemsize: int

    @property
    def needs(self) -> int:
        """The bytes from the storage's start to the tensor's last element."""
        if 0 in self.size:
            return 0
        return (self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1) * self.itemsize


class _StorageScan(pickle.Unpickler):
    """Reads a torch.save pickle for where its tensors lie, calling nothing of torch's or the
    file's: tensors become `_Stored` records, every other global an inert placeholder."""

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _stored_v2
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return _stored_v3
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return lambda data, *rest: data
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name == "Size":
            return tuple
        if module == "torch" and name.endswith("Storage"):
            try:
                return _StorageType(1 if name == "UntypedStorage" else _storage_dtype(name).itemsize)
            except KeyError:
                return _Inert
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _Inert

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return str(key), numel * storage_type.itemsize, storage_type.itemsize

    def tensors(self) -> list[tuple[str, _Stored]]:
        """Every tensor, named by the key that holds it (nested dicts: the innermost key)."""
        out, todo = [], [("", self.load())]
        while todo:
            name, value = todo.pop()
            if isinstance(value, _Stored):
                out.append((name, value))
            elif isinstance(value, dict):
                todo.extend((str(k), v) for k, v in value.items())
            elif isinstance(value, (list, tuple)):
                todo.extend((name, v) for v in value)
        return out


@dataclass(frozen=True)
class _StorageType:
    itemsize: int


class _Inert:
    """Stands in for any other global of the pickle; accepts whatever the pickle does with it."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


def _stored_v2(storage, offset, size, stride, *rest):
    """`_rebuild_tensor_v2`: the tensor has its storage's dtype."""
    return _stored(storage, offset, size, stride, storage[2] if isinstance(storage, tuple) else None)


def _stored_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *rest):
    """`_rebuild_tensor_v3`: an untyped storage and the tensor's dtype."""
    return _stored(storage, offset, size, stride, dtype.itemsize if isinstance(dtype, torch.dtype) else None)


def _stored(storage, offset, size, stride, itemsize):
    def counts(xs):
        return isinstance(xs, tuple) and all(type(x) is int and x >= 0 for x in xs)

    if not (isinstance(storage, tuple) and itemsize and type(offset) is int and offset >= 0 and counts(size)
            and counts(stride) and len(size) == len(stride)):
        return _Inert()
    return _Stored(storage[0], storage[1], offset, size, stride, itemsize)


def _pickle_sha256(path) -> str | None:
    """sha256 of the pickle inside a zip-format torch file (cheap: no tensor data), else None."""
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            return hashlib.sha256(z.read(pkl)).hexdigest() if pkl else None
    except (zipfile.BadZipFile, OSError):
        return None
