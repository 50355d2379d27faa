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

    def run(self, job: "Job", units: Sequence["Unit"], on_result: Callable[["UnitResult"], None]) -> None:
        """Run `units`; call `on_result` in the caller's thread once per finished unit; return
        when all are done, or raise (DistSvcError for the user's mistakes)."""


def build_executor(cluster: str | None = None, device: str | None = None, threads: int | None = None,
                   log: Callable[[str], None] = lambda line: None) -> Executor:
    """The executor the CLI's options ask for: a Ray cluster's address ('auto': RAY_ADDRESS, else
    the local one), else the local executor on `device` with `threads` units in flight."""
    if cluster is not None:
        from dist_svc.executors.ray_cluster import RayExecutor

        return RayExecutor(address=None if cluster == "auto" else cluster, log=log)
    from dist_svc.executors.local import LocalExecutor

    return LocalExecutor(device=device, threads=threads)


def __getattr__(name: str):
    if name == "LocalExecutor":  # the embedded default, importable from here (it imports torch)
        from dist_svc.executors.local import LocalExecutor

        return LocalExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Executor", "LocalExecutor", "build_executor"]
