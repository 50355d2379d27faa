"""The worker: one unit in, its bytes on storage and a little metadata out.

Every executor runs this same code (in-process for the local executor, inside an actor for the
Ray executor), so every executor produces the same bytes. A worker reads exactly the tensors it
needs from the inputs, computes the task vectors, the base method and the calibration, writes
the result at its planned offset in the output shard, fsyncs, and returns the checksum. Tensors
never travel back to the driver.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from dist_svc.calibration import calibrate_singular_values
from dist_svc.config import MergeConfig
from dist_svc.errors import DistSvcError
from dist_svc.methods import METHODS
from dist_svc.plan import Unit, open_inputs
from dist_svc.storage.hf_output import write_at
from dist_svc.storage.safetensors_reader import DTYPES, SafetensorsCheckpoint


@dataclass(frozen=True)
class Job:
    """What every worker of one merge needs to know (small and picklable)."""

    config: MergeConfig
    shard_paths: tuple[Path, ...]  # the .partial file of each output shard


@dataclass(frozen=True)
class UnitResult:
    name: str
    sha256: str
    seconds: float
    calibration: dict | None


class Worker:
    def __init__(self, job: Job, device: str | torch.device = "cpu"):
        self.job = job
        self.device = torch.device(device)
        config = job.config
        self.base, self.models = open_inputs(config)
        self.method = METHODS[config.merge_method]
        self.weights = [m.weight for m in config.models]
        # Half-precision compute is promoted: bf16 task vectors lose most of their bits.
        self.compute_dtype = torch.float64 if config.dtype == "float64" else torch.float32

    def run(self, unit: Unit) -> UnitResult:
        start = time.perf_counter()
        config = self.job.config
        base = self._read(self.base, unit.name)
        merged = self.method.merge(_TaskDeltas(self, unit.name, base), self.weights, config.parameters)
        stats = None
        if unit.calibrate:
            cal = config.calibration
            calibrated = calibrate_singular_values(
                merged, _TaskDeltas(self, unit.name, base), alpha=cal.resolved_alpha(config.k),
                side=cal.side, target=cal.target)
            merged = calibrated.delta
            stats = calibrated.summary()
        out = (base.to(merged.dtype) + merged).to(DTYPES[unit.out_dtype][0])
        data = _as_bytes(out)
        digest = hashlib.sha256(data).hexdigest()
        write_at(self.job.shard_paths[unit.place.shard], unit.place.offset, data)
        return UnitResult(unit.name, digest, time.perf_counter() - start, stats)

    def _read(self, checkpoint: SafetensorsCheckpoint, name: str) -> torch.Tensor:
        tensor = checkpoint.read(name).to(self.device, self.compute_dtype)
        if not torch.isfinite(tensor).all():
            raise DistSvcError(f"tensor '{name}' in {checkpoint.tensors[name].file} contains NaN or Inf values; "
                               f"merging it would spread them. Repair or replace that checkpoint.")
        return tensor

    def close(self) -> None:
        self.base.close()
        for m in self.models:
            m.close()


class _TaskDeltas:
    """The task vectors `ft_i - base` of one tensor, read from storage one at a time when iterated,
    so memory holds one of them however many tasks there are."""

    def __init__(self, worker: Worker, name: str, base: torch.Tensor):
        self.worker, self.name, self.base = worker, name, base

    def __len__(self) -> int:
        return len(self.worker.models)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for model in self.worker.models:
            # Out of place: a tensor read from storage may alias its file's mapping.
            yield torch.sub(self.worker._read(model, self.name), self.base)


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
    return memoryview(flat.numpy())
