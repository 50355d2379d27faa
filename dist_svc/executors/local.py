"""The embedded default: units run one after another in this process. No cluster, no server."""

from __future__ import annotations

from typing import Callable, Sequence

from dist_svc.plan import Unit
from dist_svc.worker import Job, UnitResult, Worker


class LocalExecutor:
    name = "local"

    def __init__(self, device: str = "cpu", **worker_options):
        """`worker_options` go to `Worker` (block size, pass-2 cache budget)."""
        self.device = device
        self.worker_options = worker_options

    def run(self, job: Job, units: Sequence[Unit], on_result: Callable[[UnitResult], None]) -> None:
        worker = Worker(job, self.device, **self.worker_options)
        try:
            for unit in units:
                on_result(worker.run(unit))
        finally:
            worker.close()
