"""The embedded default: units run in this process. No cluster, no server.

Several units are in flight at once, one per worker thread (by default one per core on a CPU),
each on its own `Worker`: torch's kernels, positional reads and writes and hashing all release
the GIL, so units compute on every core and one unit's I/O overlaps another's arithmetic. A
unit starts only when its memory footprint fits what the units in flight leave of the budget
(dist_svc.memory): the largest that fits goes first, small ones fill in beside a large one.
Results are handed to the driver in its own thread.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Callable, Sequence

from dist_svc.errors import DistSvcError
from dist_svc.executors import Capacity, ExecutionOptions, execution_options
from dist_svc.memory import Footprint, MemoryBudget, Pending, default_budget, device_budget, too_big, unit_footprint
from dist_svc.plan import Unit, open_inputs
from dist_svc.progress import human_bytes
from dist_svc.worker import Job, UnitResult, Worker, setup_process

# On a GPU the arithmetic is fast and the reads are the limit: more units in flight keep more
# reads going (H100, 0.7B x 4 inputs, cold cache: 46% / 52% / 57% of the disk's read rate with
# 2 / 4 / 8 threads); the memory budget decides how many fit.
GPU_THREADS = 8


class LocalExecutor:
    name = "local"
    # Workers write from this process: their checksums need no re-reading (results_verified),
    # and the driver makes their bytes durable before it records their units (one fdatasync
    # per file per manifest save, not per tensor).
    results_verified = True
    driver_syncs = True

    def __init__(self, options: ExecutionOptions | None = None, **given):
        """`options` (or its fields as keywords): `device` "cuda" (every GPU of this machine, a
        group of workers on each), "cuda:N" (that one), or "cpu"; default: the GPUs when present,
        else the CPU. `threads`: units in flight at most (default: the CPU's cores; 8 per GPU).
        `memory_limit`: bytes of host memory the units in flight may hold (default: what the
        machine has, minus a margin); each GPU's own memory bounds the units on it. `devices`
        names the devices outright. `block_elements`, `cache_bytes` go to every `Worker`."""
        import torch

        self.options = options = execution_options(options, given)
        device = options.device
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.on_gpu = str(device).startswith("cuda")
        devices = options.devices
        if devices is None:
            count = torch.cuda.device_count() if self.on_gpu and torch.cuda.is_available() else 0
            devices = [f"cuda:{i}" for i in range(count)] if device == "cuda" and count > 1 else [device]
        self.devices = list(devices)
        threads = options.threads
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise DistSvcError(f"--threads {threads} (threads=, mergekit's -j): the units in flight at once must be "
                               f"a whole number of at least 1 (default: the CPU's cores; {GPU_THREADS} per GPU). "
                               f"Nothing was written.")
        default = GPU_THREADS * len(self.devices) if self.on_gpu else (os.cpu_count() or 1)
        self.threads = threads if threads is not None else default
        self.memory_limit = options.memory_limit
        self.worker_options = options.worker_options()
        self.peak_units = 0  # the most units that were in flight at once, after `run`

    def budget(self) -> Footprint:
        """The memory one unit may hold at most: host bytes, and the smallest GPU's."""
        host = self.memory_limit if self.memory_limit is not None else default_budget()
        return Footprint(host, min(device_budget(d) for d in self.devices) if self.on_gpu else 0)

    def capacity(self) -> Capacity:
        return Capacity(1, self.threads, self.budget(), self.device, here=True, pool="process")

    def footprint(self, unit: Unit, config, configs=()) -> Footprint:
        return unit_footprint(unit, config, self.on_gpu, configs=configs, **self.worker_options)

    def check(self, config, units: Sequence[Unit], configs=()) -> None:
        """Every unit fits the budget on its own (checked before anything is written)."""
        limit = self.budget()
        for unit in units:
            need = self.footprint(unit, config, configs)
            if not need.fits(limit):
                raise DistSvcError(too_big(unit, need, limit))

    def describe(self) -> str:
        limit = self.budget()
        gpu = f", {human_bytes(limit.device)} on each GPU" if self.on_gpu else ""
        return (f"local: up to {self.threads} units at once on {', '.join(self.devices)}, within "
                f"{human_bytes(limit.host)}{gpu}")

    def connect(self) -> None:
        """The device exists (checked before anything is written)."""
        import torch

        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise DistSvcError(f"--device {self.device!r} is not a device; use cpu, cuda or cuda:N.") from None
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if not count or (device.index or 0) >= count:
                raise DistSvcError(f"device {self.device} (--device, --cuda): this machine has {count or 'no'} CUDA "
                                   f"device(s) usable by this torch ({torch.__version__}); nothing was written. Merge "
                                   f"on the CPU (--device cpu), or install a CUDA build of torch on a machine with a GPU.")
        elif device.type != "cpu":
            raise DistSvcError(f"--device {self.device}: only cpu and cuda devices are supported.")

    def run(self, job: Job, units: Sequence[Unit], on_result: Callable[[UnitResult], None],
            on_progress: Callable[[str, int], None] | None = None) -> None:
        import torch

        threads = torch.get_num_threads()
        for device in self.devices:
            setup_process(device)
        try:
            self._run(job, units, on_result, on_progress)
        finally:
            torch.set_num_threads(threads)  # the process is the caller's again (the Python API)

    def _run(self, job: Job, units: Sequence[Unit], on_result: Callable[[UnitResult], None],
             on_progress: Callable[[str, int], None] | None) -> None:
        host = self.budget().host
        budget = MemoryBudget(host, [device_budget(d) for d in self.devices] if self.on_gpu else [])
        key = (lambda fp: fp.device) if self.on_gpu else (lambda fp: fp.host)
        configs = [t.config for t in job.targets]
        pending = Pending([(u, self.footprint(u, job.config, configs)) for u in units], key)
        stop = threading.Event()
        results: queue.Queue = queue.Queue()
        first, rest = open_inputs(job.config, pins=job.pins)  # once, shared by every worker thread
        checkpoints = [first, *rest]

        def loop(index: int) -> None:
            worker = None
            slot = index % len(self.devices)  # the workers are spread over the devices
            try:
                worker = Worker(job, self.devices[slot], sync=False, checkpoints=checkpoints,
                                progress=lambda name, nbytes: results.put((name, nbytes)), **self.worker_options)
                while True:
                    ticket = budget.take(pending, stop, slot if self.on_gpu else None)
                    if ticket is None:
                        break
                    try:
                        for result in worker.run(ticket.unit, ticket):
                            results.put(result)
                    finally:
                        ticket.release()
            except BaseException as e:  # handed to the driver's thread, raised there
                results.put(e)
            finally:
                if worker is not None:
                    worker.close()
                results.put(None)

        threads = [threading.Thread(target=loop, args=(i,), name=f"dist-svc-worker-{i}", daemon=True)
                   for i in range(min(self.threads, len(units)))]
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
                elif isinstance(item, tuple):
                    if on_progress is not None:
                        on_progress(*item)
                elif error is None:
                    on_result(item)
        except BaseException:
            stop.set()
            raise
        finally:
            stop.set()
            for t in threads:
                t.join()
            for checkpoint in checkpoints:
                checkpoint.close()
            self.peak_units = budget.peak_units
        if error is not None:
            raise error
