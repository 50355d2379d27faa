"""The plan: every output tensor, its sources and the exact place its bytes go, from headers alone.

Deterministic: the same inputs and config give the same plan, and the same fingerprint, which
is how a rerun recognises the merge it is resuming.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from dist_svc import __version__
from dist_svc.calibration import should_calibrate
from dist_svc.config import MergeConfig
from dist_svc.errors import DistSvcError
from dist_svc.storage.hf_output import Placement, ShardLayout, layout_shards
from dist_svc.storage import open_checkpoint
from dist_svc.storage.safetensors_reader import NAME_TO_ST, SafetensorsCheckpoint

PLAN_FORMAT = 1
DEFAULT_SHARD_BYTES = 5 * 10**9  # as transformers' and mergekit's default of "5GB"


@dataclass(frozen=True)
class Unit:
    """One work unit: one output tensor."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str  # safetensors code
    calibrate: bool
    place: Placement

    @property
    def nbytes(self) -> int:
        return self.place.nbytes


@dataclass(frozen=True)
class Plan:
    units: tuple[Unit, ...]
    shards: tuple[ShardLayout, ...]
    inputs: dict  # path -> file identities, for the fingerprint
    settings: dict  # config + layout settings that decide the bytes
    fingerprint: str

    @property
    def total_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    def summary(self) -> str:
        calibrated = sum(u.calibrate for u in self.units)
        return (f"{len(self.units)} tensors ({calibrated} calibrated), {self.total_bytes / 2**30:.2f} GiB "
                f"in {len(self.shards)} shard(s)")


def open_inputs(config: MergeConfig) -> tuple[SafetensorsCheckpoint, list[SafetensorsCheckpoint]]:
    """The base and the models, each a safetensors checkpoint or a zarr store (mixing is fine)."""
    base = open_checkpoint(config.base_model)
    models = [open_checkpoint(m.path) for m in config.models]
    return base, models


def build_plan(config: MergeConfig, base: SafetensorsCheckpoint, models: list[SafetensorsCheckpoint],
               max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Plan:
    _check_compatible(base, models)
    order = base.order()  # the base's own order: output shards group like the input's
    out_dtype = NAME_TO_ST[config.out_dtype] if config.out_dtype else None
    entries = [(name, out_dtype or base.tensors[name].dtype, base.tensors[name].shape) for name in order]
    shards, placements = layout_shards(entries, max_shard_bytes)
    cal = config.calibration
    units = tuple(
        Unit(name, shape, dtype, cal.enabled and should_calibrate(name, shape, cal.skip), placements[name])
        for name, dtype, shape in entries
    )
    inputs = {str(base.path): base.identity()}
    for m in models:
        inputs[str(m.path)] = m.identity()
    settings = {"config": config.fingerprint_dict(), "max_shard_bytes": max_shard_bytes}
    fingerprint = hashlib.sha256(json.dumps(
        {"format": PLAN_FORMAT, "version": __version__, "settings": settings, "inputs": inputs},
        sort_keys=True).encode()).hexdigest()
    return Plan(units, tuple(shards), inputs, settings, fingerprint)


def _check_compatible(base: SafetensorsCheckpoint, models: list[SafetensorsCheckpoint]) -> None:
    for model in models:
        for name, info in base.tensors.items():
            other = model.tensors.get(name)
            if other is None:
                raise DistSvcError(f"tensor '{name}' of the base ({base.path}) is missing from {model.path}; "
                                   f"every model must have the base's tensors.")
            if other.shape != info.shape:
                raise DistSvcError(f"tensor '{name}' has shape {list(other.shape)} in {other.file} but "
                                   f"{list(info.shape)} in the base ({info.file}); models must share the base's architecture.")
        extra = sorted(set(model.tensors) - set(base.tensors))
        if extra:
            more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
            raise DistSvcError(f"{model.path} has tensor '{extra[0]}'{more} that the base ({base.path}) lacks; "
                               f"a fine-tune must have exactly the base's tensors.")


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '5B' (mergekit: 5 billion) or a plain byte count."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}
    suffix = next((u for u in units if s.endswith(u)), "")
    number, factor = s[: len(s) - len(suffix)], units.get(suffix, 1)
    try:
        value = float(number)
    except ValueError:
        raise DistSvcError(f"shard size '{text}' is not a size; write e.g. 5GB, 500MB or 2GiB.") from None
    if value <= 0:
        raise DistSvcError(f"shard size '{text}' must be positive.")
    return int(value * factor)
