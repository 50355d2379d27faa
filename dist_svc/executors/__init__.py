"""Executors run a merge's pending units through `Worker` and report each result to the driver.

An executor decides only where and in what order units run; the bytes come from the worker, so
every executor writes the same output. To add one: a module implementing `Executor`, a branch
in `build_executor`, and a subclass of `tests/contracts.py: ExecutorContract` (docs/extending.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol, Sequence

if TYPE_CHECKING:
    from dist_svc.plan import Unit
    from dist_svc.worker import Job, UnitResult


class Executor(Protocol):
    name: str
    # Every reported unit's bytes are known to be on storage as hashed (the driver need not
    # read them again before sealing).
    results_verified: bool
    # Workers do not make their bytes durable: the driver must call the layout's
    # `make_durable` for written units before it records them.
    driver_syncs: bool

    def connect(self) -> None:
        """Reach whatever the executor runs on; called before anything is written, so that an
        unreachable cluster is refused with the output untouched."""

    def check(self, config, units: Sequence["Unit"]) -> None:
        """Refuse (DistSvcError) a merge with a unit that can never fit the memory a worker has,
        before anything is written (after `connect`)."""

    def describe(self) -> str:
        """One line: where units run, how many at once, within how much memory."""

    def run(self, job: "Job", units: Sequence["Unit"], on_result: Callable[["UnitResult"], None],
            on_progress: Callable[[str, int], None] | None = None) -> None:
        """Run `units`; call `on_result` in the caller's thread once per finished unit (and, if
        the executor can, `on_progress(name, nbytes)` as parts of a unit are done); return when
        all are done, or raise (DistSvcError for the user's mistakes)."""

    # Optional, for executors whose workers are where the bytes are (the cluster's actors):
    # `stored_checksums(layout, names, sizes) -> {name: checksum or None}`, the checksums of
    # stored tensors computed there. The driver then checks an earlier run's units and `verify
    # --cluster` checks an output without reading a tensor; without it, the layout reads them in
    # the driver's process.


def build_executor(cluster: str | None = None, device: str | None = None, threads: int | None = None,
                   memory_limit: int | None = None, log: Callable[[str], None] = lambda line: None) -> Executor:
    """The executor the CLI's options ask for: a Ray cluster's address ('auto': RAY_ADDRESS, else
    the local one), else the local executor on `device` with at most `threads` units in flight.
    `memory_limit`: bytes the units in flight may hold (per actor on a cluster)."""
    if cluster is not None:
        from dist_svc.executors.ray_cluster import RayExecutor

        return RayExecutor(address=None if cluster == "auto" else cluster, memory_limit=memory_limit, log=log)
    from dist_svc.executors.local import LocalExecutor

    return LocalExecutor(device=device, threads=threads, memory_limit=memory_limit)


def __getattr__(name: str):
    if name == "LocalExecutor":  # the embedded default, importable from here (it imports torch)
        from dist_svc.executors.local import LocalExecutor

        return LocalExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Executor", "LocalExecutor", "build_executor"]
