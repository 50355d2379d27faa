"""The cluster executor: units run in Ray actors on every node, one per GPU (or per node on a
cluster without GPUs), reading inputs from and writing outputs to storage all nodes see.

Tensors never travel through Ray, nor through the driver: an actor runs the same `Worker` as the
local executor, writes its unit's bytes at their planned offset, fsyncs, reads them back where
it wrote them and checks them against the checksum it computed while writing, and returns only
that checksum. The driver keeps the queue (largest units first, two calls in flight per actor so
the next unit's reads overlap the current one's arithmetic; small units go several to a call,
so that Ray's cost per call does not set the rate of a model of many tiny tensors) and records
what the actors return. Checking stored bytes (units an earlier run recorded, `verify
--cluster`) is spread over actors too. An actor that dies, or whose node goes away, costs only
its units in flight: they are queued again and the actor is replaced (a replacement that cannot
be placed is simply not used). A driver that dies is recovered by rerunning the same command
(the manifest).
"""

from __future__ import annotations

import collections
import os
import sys
from typing import Callable, Mapping, Sequence

from dist_svc.errors import DistSvcError
from dist_svc.executors import Capacity, ExecutionOptions, execution_options, refuse_options
from dist_svc.memory import Footprint, MemoryBudget, device_budget, too_big, unit_footprint
from dist_svc.plan import Unit, open_inputs
from dist_svc.worker import Job, UnitResult, Worker, setup_process

NAMESPACE = "dist-svc"
IN_FLIGHT_PER_ACTOR = 2
MAX_FAILURES_PER_UNIT = 4  # a unit that kills this many actors is a bug, not bad luck
# Units smaller than BATCH_BYTES go to an actor several per call, up to BATCH_BYTES or
# BATCH_UNITS together: a call costs the driver ~1 ms of CPU whatever it carries (a 47k-tensor
# MoE merge: docs/benchmarks.md), and a batch of tiny experts is still done in milliseconds.
BATCH_BYTES = 8 << 20
BATCH_UNITS = 64
CHECK_BATCH_BYTES = 256 << 20  # stored tensors checked per call (`stored_checksums`)


def _ray():
    try:
        import ray
    except ImportError:
        raise DistSvcError("--cluster needs Ray: pip install 'dist-svc[cluster]' (or pip install ray).") from None
    return ray


def _messages_to_file() -> Callable[[], str | None]:
    """Ray prints cluster events (a worker or a node lost, with the last lines of its log) on the
    driver's stdout even with `log_to_driver=False`: after a node is lost they bury the merge's
    own lines. They go to `dist-svc-driver-PID.log` in the Ray session's log directory instead
    (Ray's own logs are there too). Call before `ray.init`; the returned function, called after
    it, gives that file's path (None where this Ray has no such hook: it prints as it does)."""
    try:
        from ray._private import worker as ray_worker  # no public switch for these messages
    except ImportError:
        return lambda: None
    if not callable(getattr(ray_worker, "print_to_stdstream", None)):
        return lambda: None

    def path() -> str | None:
        node = getattr(ray_worker, "_global_node", None)
        if node is None:
            return None
        return os.path.join(node.get_logs_dir_path(), f"dist-svc-driver-{os.getpid()}.log")

    def to_file(data: dict, ignore_prefix: bool = False) -> None:
        where = path()
        lines = "".join(f"({data.get('pid', 'ray')}) {line}\n" for line in data.get("lines", ()))
        try:
            with open(where, "a", encoding="utf-8") as f:
                f.write(lines)
        except (OSError, TypeError):  # no session directory here: keep them rather than lose them
            sys.stderr.write(lines)

    ray_worker.print_to_stdstream = to_file

    def created() -> str | None:
        where = path()
        try:
            open(where, "a").close()
        except (OSError, TypeError):
            return None
        return where

    return created


class MergeActor:
    """One worker process on a node, on that node's GPU (or CPU). It runs IN_FLIGHT_PER_ACTOR
    calls of units at once (and answers `ready` beside them), each thread with a `Worker` of its
    own over the same opened inputs; a unit starts once its footprint fits the actor's memory
    (what it declared to Ray)."""

    def __init__(self, job: Job, memory: int, worker_options: dict, device: str | None = None):
        import threading

        import torch

        self.job = job
        self.targets = job.targets
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        setup_process(self.device)
        self.options = worker_options
        self.local = threading.local()
        first, rest = open_inputs(job.config, pins=job.pins)
        self.checkpoints = [first, *rest]
        on_gpu = self.device == "cuda"
        self.budget = MemoryBudget(memory, [device_budget(self.device)] if on_gpu else [])
        self.device_index = 0 if on_gpu else None
        configs = [t.config for t in job.targets]
        self.footprint = lambda unit: unit_footprint(unit, job.config, on_gpu, configs=configs, **self.options)
        self.where = f"{os.uname().nodename}:{os.getpid()}:{self.device}"

    def ready(self) -> str:
        return self.where

    def run(self, units: list[Unit]) -> list[list[UnitResult] | None]:
        """Merge `units` one after another. A unit's results (one per target it feeds) are
        returned only once its bytes, durable, read back where they were written to the checksum
        the worker computed as it wrote them; None where they do not (the driver runs that unit
        again)."""
        worker = getattr(self.local, "worker", None)
        if worker is None:
            worker = self.local.worker = Worker(self.job, self.device, sync=True, checkpoints=self.checkpoints,
                                                **self.options)
        results: list[UnitResult | None] = []
        for unit in units:
            ticket = self.budget.admit(unit, self.footprint(unit), self.device_index)
            try:
                result = worker.run(unit, ticket)
            finally:
                ticket.release()
            read_back = all(r.error is not None or self.targets[r.target].layout.stored_checksum(r.name) == r.checksum
                            for r in result)
            results.append(result if read_back else None)
        return results


class CheckActor:
    """Checksums of stored tensors, computed on a node of the cluster (`stored_checksums`)."""

    def __init__(self, layout):
        self.layout = layout

    def checksums(self, names: list[str]) -> list[str | None]:
        return [self.layout.stored_checksum(name) for name in names]


def batches(units: Sequence[Unit], actors: int) -> list[list[Unit]]:
    """`units` as calls, in their order: a unit of BATCH_BYTES or more alone, smaller ones
    together, up to BATCH_BYTES and BATCH_UNITS per call, and to few enough per call that every
    actor gets several calls (a small model's units are not all given to one actor)."""
    most = max(1, min(BATCH_UNITS, len(units) // (4 * IN_FLIGHT_PER_ACTOR * max(actors, 1))))
    return _groups(units, lambda unit: unit.nbytes, BATCH_BYTES, most)


def _groups(items: Sequence, size: Callable[[object], int], limit: int, most: int = 1 << 62) -> list[list]:
    """`items` in order, in groups of at most `limit` bytes and `most` items (an item of
    `limit` bytes or more alone)."""
    out: list[list] = []
    total = limit
    for item in items:
        if total + size(item) > limit or len(out[-1]) >= most:
            out.append([])
            total = 0
        out[-1].append(item)
        total += size(item)
    return out


class RayExecutor:
    name = "ray"
    # Workers on other hosts fsync their own writes and read them back before they report them
    # (MergeActor.run), so sealing need not read them again.
    results_verified = True
    driver_syncs = False

    # What the local executor's options mean here, where they do not apply.
    REFUSED = {"threads": f"on a cluster each actor runs {IN_FLIGHT_PER_ACTOR} units at once and there is one actor "
                          f"per GPU (or per node without GPUs); drop it",
               "devices": "on a cluster Ray gives each actor its device; use --device cpu or cuda"}

    def __init__(self, address: str | None = "auto", options: ExecutionOptions | None = None, *,
                 actors: int | None = None, log: Callable[[str], None] = lambda line: None, **given):
        """`options` (or its fields as keywords): `memory_limit`, bytes each actor may hold for
        its units in flight (default: the memory Ray offers on the smallest node, shared by that
        node's actors), declared to Ray, which places actors where it is free; `device` "cuda"
        (one GPU per actor; the cluster must have GPUs) or "cpu" (one CPU per actor, one actor
        per node; GPUs unused), default: GPUs when the cluster has them; `block_elements`,
        `cache_bytes` go to every actor's workers. `threads` and `devices` are refused (REFUSED)."""
        self.options = options = execution_options(options, given)
        refuse_options(options, self.REFUSED, "--cluster")
        if options.device is not None and options.device not in ("cpu", "cuda"):
            raise DistSvcError(f"--cluster: --device {options.device}: on a cluster Ray gives each actor its own GPU "
                               f"(or none); use --device cuda or --device cpu. Nothing was written.")
        self.address = address
        self.actors = actors
        self.device = options.device
        self.worker_options = options.worker_options()
        self.memory_limit = options.memory_limit
        self.log = log
        self.messages: str | None = None  # where Ray's messages to this driver go (`connect`)

    def _layout(self) -> tuple[int, dict, int]:
        """(actors, resources of each, memory of each) on the cluster as it is now."""
        ray = _ray()
        gpus = 0 if self.device == "cpu" else int(ray.cluster_resources().get("GPU", 0))
        if self.device == "cuda" and not gpus:
            raise DistSvcError(f"--device cuda: the Ray cluster at {self.address or 'auto'} has no GPUs; nothing was "
                               f"written. Merge on its CPUs (--device cpu, or no --device), or add GPU nodes.")
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        count = self.actors or (gpus if gpus else len(nodes))
        resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        per_node = [(n["Resources"].get("memory", 0), int(n["Resources"].get("GPU", 0)) if gpus else 1)
                    for n in nodes if not gpus or n["Resources"].get("GPU", 0) >= 1]
        memory = self.memory_limit or int(min((m / max(k, 1) for m, k in per_node), default=0))
        return count, resources, memory

    def capacity(self) -> Capacity:
        """An actor's GPU memory is known only once it starts (0 here)."""
        count, resources, memory = self._layout()
        return Capacity(count, IN_FLIGHT_PER_ACTOR, Footprint(memory, 0), "cuda" if "num_gpus" in resources else "cpu",
                        here=False, pool="actor")

    def check(self, config, units: Sequence[Unit], configs=()) -> None:
        """Every unit fits one actor's memory (checked before anything is written)."""
        _, _, memory = self._layout()
        limit = Footprint(memory, 1 << 62)  # an actor's GPU memory is checked when it starts units
        for unit in units:
            need = unit_footprint(unit, config, False, configs=configs, **self.worker_options)
            if not need.fits(limit):
                raise DistSvcError(too_big(unit, need, limit))

    def describe(self) -> str:
        count, resources, memory = self._layout()
        return (f"cluster: {count} actor(s) ({'1 GPU' if 'num_gpus' in resources else '1 CPU'} each), "
                f"{memory / 2**30:.1f} GiB of memory each")

    def connect(self) -> None:
        """Join the cluster (the driver calls this before it writes anything). An address where
        nothing listens is refused at once: Ray itself would retry for minutes."""
        ray = _ray()
        if ray.is_initialized():
            return
        address = self.address or os.environ.get("RAY_ADDRESS") or "auto"
        hint = "Start one (see cluster/README.md) or pass its address to --cluster."
        host_port = address.removeprefix("ray://")
        if address != "auto" and ":" in host_port:
            import socket

            host, port = host_port.rsplit(":", 1)
            try:
                socket.create_connection((host, int(port)), timeout=5).close()
            except (OSError, ValueError) as e:
                raise DistSvcError(f"no Ray cluster answers at {address} ({e}). {hint}") from None
        messages = _messages_to_file()
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise DistSvcError(f"cannot connect to the Ray cluster at '{address}': {e}. {hint}") from None
        self.messages = messages()
        if self.messages:
            self.log(f"cluster: Ray's own messages (workers or nodes lost, with their last log lines) go to "
                     f"{self.messages}; its logs are in {os.path.dirname(self.messages)}")

    def run(self, job: Job, units: Sequence[Unit], on_result: Callable[[UnitResult], None],
            on_progress: Callable[[str, int], None] | None = None) -> None:
        """`on_progress` is not called: progress on a cluster advances as units finish."""
        ray = _ray()
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        self.connect()
        count, resources, memory = self._layout()
        # One thread more than calls in flight: `ready` is answered while both run units.
        remote_cls = ray.remote(max_concurrency=IN_FLIGHT_PER_ACTOR + 1, max_restarts=0, max_task_retries=0)(MergeActor)

        started = iter(range(1 << 30))

        def start_actor():
            # Named, so that operators (and the tests) can find the workers of a run.
            name = f"merge-{os.getpid()}-{next(started)}"
            handle = remote_cls.options(name=name, namespace=NAMESPACE, scheduling_strategy="SPREAD", memory=memory,
                                        **resources).remote(job, memory, self.worker_options,
                                                            "cpu" if self.device == "cpu" else None)
            return handle, handle.ready.remote()

        starting = dict(start_actor() for _ in range(count))  # handle -> ready ref
        ready_actors: list = []
        queue = collections.deque(batches(units, count))
        inflight: dict = {}  # ref -> (batch of units, actor)
        load: dict = {}  # actor -> calls in flight
        failures: collections.Counter = collections.Counter()
        done = 0
        try:
            while done < len(units):
                # Actors that finished starting join the pool; work goes to the least loaded.
                if starting:
                    ready_refs, _ = ray.wait(list(starting.values()), num_returns=len(starting), timeout=0)
                    for actor, ref in list(starting.items()):
                        if ref in ready_refs:
                            del starting[actor]
                            try:
                                where = ray.get(ref)
                            except RayActorError:
                                continue  # died while starting; its node may be gone
                            ready_actors.append(actor)
                            load[actor] = 0
                            self.log(f"cluster: actor ready on {where}")
                for actor in ready_actors:
                    while queue and load[actor] < IN_FLIGHT_PER_ACTOR:
                        batch = queue.popleft()
                        inflight[actor.run.remote(batch)] = (batch, actor)
                        load[actor] += 1
                if not inflight:
                    if not starting:
                        raise DistSvcError("the Ray cluster has no live actors left to merge with; "
                                           "add nodes, then rerun the same command to resume.")
                    ray.wait(list(starting.values()), num_returns=1, timeout=1.0)
                    continue
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
                for ref in ready:
                    batch, actor = inflight.pop(ref)
                    load[actor] = load.get(actor, 1) - 1
                    try:
                        results = ray.get(ref)
                    except RayTaskError as e:
                        cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else e
                        if isinstance(cause, DistSvcError):
                            raise DistSvcError(str(cause)) from None
                        raise
                    except (RayActorError, GetTimeoutError) as e:
                        for unit in batch:
                            failures[unit.name] += 1
                            if failures[unit.name] >= MAX_FAILURES_PER_UNIT:
                                raise DistSvcError(f"tensor '{unit.name}' failed on {failures[unit.name]} actors "
                                                   f"(last: {type(e).__name__}); see Ray's account in "
                                                   f"{self.messages or 'the Ray logs'}.") from None
                        queue.appendleft(batch)  # partial bytes never count: they are written again
                        if actor in ready_actors:
                            self._retire(ray, actor, ready_actors, load, inflight, queue)
                            handle, ref_ready = start_actor()
                            starting[handle] = ref_ready
                            self.log(f"cluster: an actor died ({type(e).__name__}); its units are queued "
                                     f"again and a replacement is starting"
                                     + (f" (Ray's account: {self.messages})" if self.messages else ""))
                        continue
                    for unit, result in zip(batch, results):
                        if result is None:  # its bytes did not read back as hashed: written again
                            failures[unit.name] += 1
                            if failures[unit.name] >= MAX_FAILURES_PER_UNIT:
                                raise DistSvcError(f"tensor '{unit.name}': its bytes read back from "
                                                   f"{job.layout.out_dir} differed from those written, "
                                                   f"{failures[unit.name]} times; the storage may be failing. "
                                                   f"Check it, then rerun the same command.")
                            queue.appendleft([unit])
                            continue
                        for each in result:
                            on_result(each)
                        done += 1
        finally:
            for actor in ready_actors + list(starting):
                ray.kill(actor, no_restart=True)

    @staticmethod
    def _retire(ray, actor, ready_actors, load, inflight, queue) -> None:
        """Drop a dead actor: its other calls in flight go back to the queue."""
        ready_actors.remove(actor)
        load.pop(actor, None)
        for ref, (batch, owner) in list(inflight.items()):
            if owner is actor:
                del inflight[ref]
                queue.appendleft(batch)
        ray.kill(actor, no_restart=True)

    def stored_checksums(self, layout, names: Sequence[str], sizes: Mapping[str, int]) -> dict[str, str | None]:
        """The checksum of each named tensor as stored now (None: missing or unreadable),
        computed by actors on the cluster's nodes, in parallel; the driver sees only the
        digests. `sizes`: each tensor's bytes (to size the calls)."""
        ray = _ray()
        from ray.exceptions import RayActorError

        self.connect()
        if not names:
            return {}
        count, resources, _ = self._layout()
        remote_cls = ray.remote(max_concurrency=1, max_restarts=0, max_task_retries=0)(CheckActor)
        actors = [remote_cls.options(scheduling_strategy="SPREAD", **resources).remote(layout) for _ in range(count)]
        queue = collections.deque(_groups(names, sizes.__getitem__, CHECK_BATCH_BYTES))
        out: dict[str, str | None] = {}
        inflight: dict = {}  # ref -> (names, actor)
        try:
            while queue or inflight:
                busy = {actor for _, actor in inflight.values()}
                for actor in actors:
                    if queue and actor not in busy:
                        batch = queue.popleft()
                        inflight[actor.checksums.remote(batch)] = (batch, actor)
                if not inflight:
                    raise DistSvcError("the Ray cluster has no live actors left to check the stored tensors "
                                       "with; add nodes, then run the same command again.")
                ready, _ = ray.wait(list(inflight), num_returns=1)
                for ref in ready:
                    batch, actor = inflight.pop(ref)
                    try:
                        out.update(zip(batch, ray.get(ref)))
                    except RayActorError:  # its node went away: another actor checks its tensors
                        actors.remove(actor)
                        queue.appendleft(batch)
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)
        return out

