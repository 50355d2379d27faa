"""The embedded default: units run in this process. No cluster, no server.

With `threads > 1` several units are in flight at once, each on its own `Worker`: torch's
kernels, positional reads and writes and hashing all release the GIL, so one unit's I/O overlaps
another's arithmetic. Results are handed to the driver in its own thread.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Callable, Sequence

from dist_svc.errors import DistSvcError
from dist_svc.plan import Unit
from dist_svc.worker import Job, UnitResult, Worker, setup_process

DEFAULT_THREADS = 2
# On a GPU the arithmetic is fast and the reads are the limit: more units in flight keep more
# reads going (H100, 0.7B x 4 inputs, cold cache: 46% / 52% / 57% of the disk's read rate with
# 2 / 4 / 8 threads). Each also holds its Grams and pass-2 blocks in GPU memory (~4.5 GB at
# Llama-70B's largest matrix, K = 3), so 4, not 8.
GPU_THREADS = 4


class LocalExecutor:
    name = "local"
    # Workers write from this process: their checksums need no re-reading (results_verified),
    # and the driver makes their bytes durable before it records their units (one fdatasync
    # per file per manifest save, not per tensor).
    results_verified = True
    driver_syncs = True

    def __init__(self, device: str | None = None, threads: int | None = None, **worker_options):
        """`device`: "cuda" when a GPU is present, else "cpu", unless given. `worker_options` go
        to `Worker` (block size, pass-2 cache budget)."""
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        default = GPU_THREADS if str(device).startswith("cuda") else min(DEFAULT_THREADS, os.cpu_count() or 1)
        self.threads = max(1, threads if threads is not None else default)
        self.worker_options = worker_options

    def connect(self) -> None:
        """The device exists (checked before anything is written)."""
        import torch

        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise DistSvcError(f"--device {self.device!r} is not a device; use cpu, cuda or cuda:N.") from None
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if (device.index or 0) >= count:
                raise DistSvcError(f"device {self.device} (--device, --cuda): this machine has {count or 'no'} CUDA "
                                   f"device(s) usable by this torch ({torch.__version__}); nothing was written. Merge "
                                   f"on the CPU (--device cpu), or install a CUDA build of torch on a machine with a GPU.")
        elif device.type != "cpu":
            raise DistSvcError(f"--device {self.device}: only cpu and cuda devices are supported.")

    def run(self, job: Job, units: Sequence[Unit], on_result: Callable[[UnitResult], None]) -> None:
        import torch

        threads = torch.get_num_threads()
        setup_process(self.device)
        try:
            self._run(job, units, on_result)
        finally:
            torch.set_num_threads(threads)  # the process is the caller's again (the Python API)

    def _run(self, job: Job, units: Sequence[Unit], on_result: Callable[[UnitResult], None]) -> None:
        if self.threads == 1 or len(units) <= 1:
            worker = Worker(job, self.device, sync=False, **self.worker_options)
            try:
                for unit in units:
                    on_result(worker.run(unit))
            finally:
                worker.close()
            return

        todo = iter(units)
        take = threading.Lock()
        stop = threading.Event()
        results: queue.Queue = queue.Queue()

        def loop() -> None:
            worker = None
            try:
                worker = Worker(job, self.device, sync=False, **self.worker_options)
                while not stop.is_set():
                    with take:
                        unit = next(todo, None)
                    if unit is None:
                        break
                    results.put(worker.run(unit))
            except BaseException as e:  # handed to the driver's thread, raised there
                results.put(e)
            finally:
                if worker is not None:
                    worker.close()
                results.put(None)

        threads = [threading.Thread(target=loop, name=f"dist-svc-worker-{i}", daemon=True)
                   for i in range(self.threads)]
        for t in threads:
            t.start()
        running = len(threads)
        error: BaseException | None = None
        try:
            while running:
                item = results.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    error = error or item
                    stop.set()
                elif error is None:
                    on_result(item)
        except BaseException:
            stop.set()
            raise
        finally:
            stop.set()
            for t in threads:
                t.join()
        if error is not None:
            raise error
