"""Executors run a merge's pending units through `Worker` and report each result to the driver.

An executor decides only where and in what order units run; the bytes come from the worker, so
every executor writes the same output. Each takes one `ExecutionOptions` (as Ray Data's
executors do) and applies every option it is given, or refuses it by name before anything is
written. To add one: a module implementing `Executor`, a branch in `build_executor`, and a
subclass of `tests/contracts.py: ExecutorContract` (docs/extending.md).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Callable, Mapping, Protocol, Sequence

from dist_svc.errors import DistSvcError

if TYPE_CHECKING:
    from dist_svc.memory import Footprint
    from dist_svc.plan import Unit
    from dist_svc.worker import Job, UnitResult


@dataclass(frozen=True)
class ExecutionOptions:
    """How units run, whatever runs them; None leaves an option to the executor's default."""
    device: str | None = None  # "cpu", "cuda", "cuda:N"
    threads: int | None = None  # units in flight at most
    memory_limit: int | None = None  # bytes the units in flight may hold (per actor on a cluster)
    devices: Sequence[str] | None = None  # the devices named outright (several workers per device)
    block_elements: int | None = None  # elements a worker reads at once (dist_svc.blocks)
    cache_bytes: int | None = None  # pass-1 blocks a worker keeps for pass 2 (dist_svc.memory)

    def given(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def worker_options(self) -> dict[str, int]:
        """What goes to every `Worker` (and to its units' footprints)."""
        return {k: v for k, v in self.given().items() if k in ("block_elements", "cache_bytes")}


# How a user gives each option (the command line's flag, the Python API's keyword).
_SPELLED = {"device": "--device {} (device=)", "threads": "--threads {} (threads=, mergekit's -j)",
            "memory_limit": "--memory-limit {} (memory_limit=)"}


def execution_options(options: ExecutionOptions | None, given: Mapping[str, object]) -> ExecutionOptions:
    """`options` with the fields `given` as keywords: whatever takes ExecutionOptions takes its
    fields as keywords too (LocalExecutor(threads=2), build_executor(threads=1))."""
    return replace(options or ExecutionOptions(), **given)


def refuse_options(options: ExecutionOptions, refused: Mapping[str, str], executor: str) -> None:
    """One paragraph naming every option given that `executor` does not apply, and why (`refused`:
    option -> why not), before anything is written."""
    given = options.given()
    wrong = [_SPELLED.get(name, name + "={!r}").format(given[name]) + f": {why}" for name, why in refused.items()
             if name in given]
    if wrong:
        raise DistSvcError(f"{executor}: " + "; ".join(wrong) + ". Nothing was written.")


@dataclass(frozen=True)
class Capacity:
    """What an executor runs units with: `pools` (this process; each actor), each holding at most
    `per_pool` units in flight within `memory` (host bytes; its GPU's bytes, 0 when it has none or
    they are known only once it starts), on `device`; `here`: in this process, so that probes of
    this machine measure where units run; `pool`: what a pool is called."""
    pools: int
    per_pool: int
    memory: "Footprint"
    device: str
    here: bool
    pool: str

    @property
    def workers(self) -> int:
        return self.pools * self.per_pool


class Executor(Protocol):
    name: str
    options: ExecutionOptions
    # Every reported unit's bytes are known to be on storage as hashed (the driver need not
    # read them again before sealing).
    results_verified: bool
    # Workers do not make their bytes durable: the driver must call the layout's
    # `make_durable` for written units before it records them.
    driver_syncs: bool

    def connect(self) -> None:
        """Reach whatever the executor runs on; called before anything is written, so that an
        unreachable cluster is refused with the output untouched."""

    def capacity(self) -> Capacity:
        """Where units will run and within how much memory (after `connect`): what a dry run
        estimates for."""

    def check(self, config, units: Sequence["Unit"], configs: Sequence = ()) -> None:
        """Refuse (DistSvcError) a merge with a unit that can never fit the memory a worker has,
        before anything is written (after `connect`). `configs`: the job's targets' configs,
        where units feed several (`Unit.variants`)."""

    def describe(self) -> str:
        """One line: where units run, how many at once, within how much memory."""

    def run(self, job: "Job", units: Sequence["Unit"], on_result: Callable[["UnitResult"], None],
            on_progress: Callable[[str, int], None] | None = None) -> None:
        """Run `units`; call `on_result` in the caller's thread once per finished unit and target
        it feeds (`Unit.variants`; and, if
        the executor can, `on_progress(name, nbytes)` as parts of a unit are done); return when
        all are done, or raise (DistSvcError for the user's mistakes)."""

    # Optional, for executors whose workers are where the bytes are (the cluster's actors):
    # `stored_checksums(layout, names, sizes) -> {name: checksum or None}`, the checksums of
    # stored tensors computed there. The driver then checks an earlier run's units and `verify
    # --cluster` checks an output without reading a tensor; without it, the layout reads them in
    # the driver's process.


def build_executor(cluster: str | None = None, options: ExecutionOptions | None = None,
                   log: Callable[[str], None] = lambda line: None, **given) -> Executor:
    """The executor the CLI's options ask for: a Ray cluster's address ('auto': RAY_ADDRESS, else
    the local one), else the local executor; each applies `options` (or its fields as keywords)
    or refuses them by name."""
    options = execution_options(options, given)
    if cluster is not None:
        from dist_svc.executors.ray_cluster import RayExecutor

        return RayExecutor(address=None if cluster == "auto" else cluster, options=options, log=log)
    from dist_svc.executors.local import LocalExecutor

    return LocalExecutor(options)


def __getattr__(name: str):
    if name == "LocalExecutor":  # the embedded default, importable from here (it imports torch)
        from dist_svc.executors.local import LocalExecutor

        return LocalExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Capacity", "ExecutionOptions", "Executor", "LocalExecutor", "build_executor"]
