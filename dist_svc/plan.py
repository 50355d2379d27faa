"""The plan: every output tensor, how it is merged and with what, from metadata alone.

Deterministic: the same inputs and config give the same plan, and the same fingerprint, which
is how a rerun recognises the merge it is resuming. Where each tensor's bytes go is the output
layout's business (dist_svc.storage.output), decided from the plan's entries.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from dist_svc import __version__
from dist_svc.calibration import should_calibrate
from dist_svc.config import MergeConfig, layer_index, layer_position
from dist_svc.errors import DistSvcError
from dist_svc.storage import open_checkpoint
from dist_svc.storage.hub import pins as hub_pins
from dist_svc.storage.output import side_files, source_files
from dist_svc.storage.types import NAME_TO_ST, Checkpoint, tensor_nbytes

PLAN_FORMAT = 2


@dataclass(frozen=True)
class Unit:
    """One work unit: one output tensor, with the parameters it is merged with (gradients over
    the layers and filters resolved for this tensor)."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str  # safetensors code
    calibrate: bool
    params: dict[str, Any]  # the method's parameters
    models: tuple[dict[str, float], ...]  # each model's parameters (weight, density)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.out_dtype, self.shape)

    def merged_with(self) -> dict[str, Any]:
        """What the manifest records of the parameters."""
        return {"params": self.params, "models": list(self.models)}


@dataclass(frozen=True)
class Plan:
    units: tuple[Unit, ...]
    inputs: dict  # checkpoint -> identity, for the fingerprint
    settings: dict  # what decides the bytes besides the inputs
    side_files: dict[str, bytes]  # the base's config and tokenizer files, as the output gets them
    fingerprint: str

    def pins(self) -> dict[str, str]:
        """The commit every Hub model was resolved to: what workers must read."""
        return hub_pins(self.inputs)

    @property
    def total_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of every output tensor, in order: what an output layout needs."""
        return [(u.name, u.out_dtype, u.shape) for u in self.units]

    def summary(self) -> str:
        calibrated = sum(u.calibrate for u in self.units)
        return f"{len(self.units)} tensors ({calibrated} calibrated), {self.total_bytes / 2**30:.2f} GiB"


def open_inputs(config: MergeConfig, pins: dict[str, str] | None = None) -> tuple[Checkpoint, list[Checkpoint]]:
    """The base and the models, each any checkpoint source (dist_svc.storage; mixing is fine): a
    LoRA adapter applies to the base. `pins`: the Hub commits the plan resolved (`Plan.pins`)."""
    base = open_checkpoint(config.base_model, pins=pins)
    try:
        return base, [open_checkpoint(m.path, base=base, pins=pins) for m in config.models]
    except BaseException:
        base.close()
        raise


def build_plan(config: MergeConfig, base: Checkpoint, models: list[Checkpoint]) -> Plan:
    _check_compatible(base, models)
    order = base.order()  # the base's own order: the output groups like the input
    out_dtype = NAME_TO_ST[config.out_dtype] if config.out_dtype else None
    layers = [i for i in map(layer_index, order) if i is not None]
    num_layers = max(layers) + 1 if layers else 0
    cal = config.calibration
    units = []
    for name in order:
        info = base.tensors[name]
        params, per_model = config.resolved(name, layer_position(name, num_layers))
        units.append(Unit(name, info.shape, out_dtype or info.dtype,
                          cal.enabled and should_calibrate(name, info.shape, cal.skip), params, per_model))
    inputs = {base.source: {"tensors": base.identity(), "side_files": {
        name: hashlib.sha256(data).hexdigest() for name, data in source_files(base).items()}}}
    for m in models:
        inputs[m.source] = {"tensors": m.identity()}
    settings = {"config": config.fingerprint_dict()}
    fingerprint = hashlib.sha256(json.dumps(
        {"format": PLAN_FORMAT, "version": __version__, "settings": settings, "inputs": inputs},
        sort_keys=True).encode()).hexdigest()
    return Plan(tuple(units), inputs, settings, side_files(base, config.out_dtype), fingerprint)


def _check_compatible(base: Checkpoint, models: list[Checkpoint]) -> None:
    for model in models:
        for name, info in base.tensors.items():
            other = model.tensors.get(name)
            if other is None:
                raise DistSvcError(f"tensor '{name}' of the base ({base.source}) is missing from {model.source}; "
                                   f"every model must have the base's tensors.")
            if other.shape != info.shape:
                raise DistSvcError(f"tensor '{name}' has shape {list(other.shape)} in {other.where} but "
                                   f"{list(info.shape)} in the base ({info.where}); models must share the base's architecture.")
        extra = sorted(set(model.tensors) - set(base.tensors))
        if extra:
            more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
            raise DistSvcError(f"{model.source} has tensor '{extra[0]}'{more} that the base ({base.source}) lacks; "
                               f"a fine-tune must have exactly the base's tensors.")
