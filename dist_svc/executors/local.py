"""The embedded default: units run one after another in this process. No cluster, no server."""

from __future__ import annotations

from typing import Callable, Sequence

from dist_svc.plan import Unit
from dist_svc.worker import Job, UnitResult, Worker


class LocalExecutor:
    name = "local"

    def __init__(self, device: str = "cpu"):
        self.device = device

    def run(self, job: Job, units: Sequence[Unit], on_result: Callable[[UnitResult], None]) -> None:
        worker = Worker(job, self.device)
        try:
            for unit in units:
                on_result(worker.run(unit))
        finally:
            worker.close()
