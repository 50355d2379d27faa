"""The story of a merge run: config -> plan -> manifest -> executor -> output layout.

`merge()` is the Python API and what `dist-svc merge` calls. It reads as its four steps:
open the output or refuse it, prepare it, run the pending units (with retries for bytes that
fail verification), finish. Rerunning it on the same output directory resumes: finished units
are skipped, whatever an interrupted run left half done is repaired, and the bytes equal an
uninterrupted run's.
"""

from __future__ import annotations

import errno
import importlib
import statistics
import time
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from dist_svc.errors import DistSvcError
from dist_svc.manifest import LOCK_NAME, MANIFEST_NAME, Manifest
from dist_svc.storage import adapter_output
from dist_svc.storage.durable import local_path
from dist_svc.storage.location import is_url
from dist_svc.storage.outdir import output_dir
from dist_svc.storage.output import FORMATS, OutputLayout, layout_for

if TYPE_CHECKING:
    from dist_svc.config import MergeConfig
    from dist_svc.executors import Executor
    from dist_svc.lowrank import AdapterReport
    from dist_svc.plan import Plan
    from dist_svc.progress import Progress
    from dist_svc.worker import Job, UnitResult

MAX_ATTEMPTS = 3  # passes over units whose bytes failed verification before giving up


@dataclass(repr=False)
class MergeReport:
    out_dir: Path | str  # a local directory, or an s3:// URL
    plan_summary: str
    units_total: int
    units_run: int
    already_complete: bool
    seconds: float
    calibration: dict[str, dict] = field(default_factory=dict)  # tensor -> calibration summary
    stages: dict[str, float] = field(default_factory=dict)  # seconds the workers spent per stage, summed
    bytes_total: int = 0  # of the merged tensors
    executor: str | None = None  # where the units ran (the executor's one line); None if none ran

    def calibration_summary(self) -> dict[str, Any] | None:
        """The calibration in three numbers (None when nothing was calibrated): matrices, and the
        median and range of the top singular value's ratio before / after calibration."""
        ratios = sorted(c["sigma_before"][0] / c["sigma_after"][0] for c in self.calibration.values()
                        if c.get("sigma_after") and c["sigma_after"][0] > 0)
        if not ratios:
            return None
        return {"matrices": len(self.calibration), "top_ratio_median": statistics.median(ratios),
                "top_ratio_min": ratios[0], "top_ratio_max": ratios[-1]}

    def __repr__(self) -> str:
        # One line: the per-tensor facts (`calibration`, thousands of entries) stay out of it.
        from dist_svc.progress import human_bytes

        done = "already complete" if self.already_complete else f"{self.units_run} run"
        cal = self.calibration_summary()
        cal_text = (f"{cal['matrices']} matrices calibrated, top singular value / {cal['top_ratio_median']:.3g} "
                    f"(median)" if cal else "no calibration")
        return (f"MergeReport({self.units_total} tensors ({done}), {human_bytes(self.bytes_total)}, "
                f"{self.seconds:.1f} s, out_dir={str(self.out_dir)!r}, {cal_text})")


def merge(config: MergeConfig | Mapping[str, Any] | str | Path, out_dir: str | Path, *,
          calibrate: bool | None = None, shard_size: str | int | None = None, progress: str = "auto",
          output_format: str | None = None, device: str | None = None, threads: int | None = None,
          cluster: str | None = None, memory_limit: str | int | None = None, executor: Executor | None = None,
          model_card: bool = True, log: Callable[[str], None] = lambda line: None) -> MergeReport | AdapterReport:
    """Merge into `out_dir`, resuming whatever an earlier run finished. `config`: a mergekit
    YAML file, or its fields as a dict (validated as the file would be), or a `MergeConfig`.
    The output is HF safetensors shards (of at most `shard_size`), or a zarr v3 store when
    `output_format` (else the config's `output:`, else an `out_dir` ending in .zarr) says so.

    Where units run, as the command line's options: `device` ("cpu", "cuda", "cuda:1"),
    `threads` (units in flight), `memory_limit` (bytes or a size such as "16GiB") for this
    process, or `cluster` (a Ray address, or "auto"); or an `executor` built outright.
    `model_card`: write README.md (dist_svc.card) when the merge finishes, as mergekit does.
    A merge of LoRA adapters written as one (`output: {format: peft}`) reports an
    `AdapterReport` (dist_svc.lowrank)."""
    result = merge_many([(config, out_dir)], calibrate=calibrate, shard_size=shard_size, progress=progress,
                        output_format=output_format, device=device, threads=threads, cluster=cluster,
                        memory_limit=memory_limit, executor=executor, model_card=model_card, log=log)[0]
    if isinstance(result, DistSvcError):
        raise result
    return result


def merge_many(items: Sequence[tuple[MergeConfig | Mapping[str, Any] | str | Path, str | Path]], *,
               calibrate: bool | None = None, shard_size: str | int | None = None, progress: str = "auto",
               output_format: str | None = None, device: str | None = None, threads: int | None = None,
               cluster: str | None = None, memory_limit: str | int | None = None, executor: Executor | None = None,
               model_card: bool = True, log: Callable[[str], None] = lambda line: None
               ) -> list[MergeReport | AdapterReport | DistSvcError]:
    """`merge` of each (config, out_dir), with merge's options, in one run: merges of the same
    inputs read them once for all (`run_merges`). One result per item: its report, or the
    DistSvcError that refused or stopped it alone; whatever else fails stops every merge."""
    start = time.perf_counter()
    choice = {"device": device, "threads": threads, "cluster": cluster, "memory_limit": memory_limit}
    if executor is not None and any(v is not None for v in choice.values()):
        raise DistSvcError(f"merge(): pass an `executor` or the options that build one "
                           f"({', '.join(k for k, v in choice.items() if v is not None)}), not both.")
    results: list = [None] * len(items)
    runs = []
    for i, (config, out_dir) in enumerate(items):
        try:
            config, out_dir = settle(config, out_dir, calibrate, output_format, shard_size)
            _refuse_inside_inputs(config, out_dir)
            own = FORMATS[config.output.format].pipeline
            if own is not None:  # a format written by a pipeline of its own (peft: LoRA adapters in factored form)
                module, function = own.split(":")
                results[i] = getattr(importlib.import_module(module), function)(config, out_dir, log)
                continue
            results[i] = _already_complete(config, out_dir, start)
        except DistSvcError as e:
            results[i] = e
        if results[i] is None:
            runs.append((i, config, out_dir))
    if runs:
        executor = executor or _executor(log=log, **choice)
        for (i, _, _), result in zip(runs, run_merges([(c, o) for _, c, o in runs], executor, progress, model_card,
                                                      log, start)):
            results[i] = result
    return results


def run_merges(outputs: Sequence[tuple[MergeConfig, Path | str]], executor: Executor, progress: str = "auto",
               model_card: bool = True, log: Callable[[str], None] = lambda line: None,
               start: float | None = None) -> list[MergeReport | DistSvcError]:
    """Merges run together: those whose units read the same (the same inputs, slices and compute
    dtype: the usual batch, dist_svc.batch) read each unit's inputs once for every output that
    still needs it (`Unit.variants`); each output is written, recorded and finished as a merge of
    its own. A merge is a run of one. One result per output: its report, or the error that
    stopped it alone (its result not finite); whatever else fails stops the run and is raised."""
    # The pipeline (and torch) is imported in `_run_group`, not with this module: `status` and
    # `verify` need only the manifest and the output layout.

    start = time.perf_counter() if start is None else start
    runs = [_Run(config, out_dir, log) for config, out_dir in outputs]
    groups: dict[tuple, list[_Run]] = {}
    for run in runs:
        groups.setdefault(run.reads(), []).append(run)
    for group in groups.values():
        _run_group(group, executor, progress, model_card, log, start)
    return [run.result for run in runs]


def _run_group(runs: list[_Run], executor: Executor, progress: str, model_card: bool, log: Callable[[str], None],
               start: float) -> None:
    """`run_merges` of outputs whose units read the same: each run's `result` is set."""
    from dist_svc.progress import Progress
    from dist_svc.worker import Job, Target

    try:
        # 1. Open each output, or refuse it, before anything is written.
        for run in runs:
            run.check(start)
        if all(run.result is not None for run in runs):
            return
        executor.connect()
        pending = [run for run in runs if run.result is None]
        executor.check(pending[0].config, _batched(pending, runs), [run.config for run in runs])
        log(executor.describe())
        with ExitStack() as stack:
            for run in pending:
                stack.enter_context(run.opened(start))
            live = [run for run in pending if run.result is None]
            try:
                # 2. Prepare: what writers need exists, and what an earlier run left matches the manifest.
                for run in live:
                    run.prepare()
                # 3. Run the pending units.
                totals = [run.manifest.progress() for run in live]
                bar = Progress(sum(p["bytes_total"] for p in totals), sum(p["units_total"] for p in totals),
                               sum(p["bytes_done"] for p in totals), sum(p["units_done"] for p in totals),
                               mode=progress)
                for run in live:
                    run.recorder = _Recorder(run.manifest, run.layout, executor, bar, run.held)
                first = runs[0]
                job = Job(first.config, first.layout, first.plan.pins(),
                          tuple(Target(run.config, run.layout) for run in runs[1:]))
                try:
                    _run_pending(runs, job, executor, _Dispatch(runs, bar))
                finally:
                    bar.close()
                # 4. Finish: index and side files (and the model card), then the manifest says so.
                for run in live:
                    if run.result is None:
                        run.finish(model_card, executor, start)
            except Exception as e:  # not an interruption (Ctrl-C, SIGTERM): the run failed, `status` says so
                for run in live:
                    if run.result is None:
                        run.failed(e)
                raise
    except OSError as e:
        raise DistSvcError(_storage_problem(e, next((run.out_dir for run in runs if run.result is None),
                                                    runs[0].out_dir))) from None


class _Run:
    """One output of `run_merges`: its plan, layout, manifest and lock, and its result."""

    def __init__(self, config: MergeConfig, out_dir: Path | str, log: Callable[[str], None]):
        self.config, self.out_dir, self.log = config, out_dir, log
        self.plan = plan_merge(config)
        log(f"plan: {self.plan.summary()}, K={config.k}, method {config.merge_method}, "
            f"calibration {'on' if config.calibration.enabled else 'off'}")
        self.layout = layout_for(config.output.format, out_dir, self.plan.entries(), config.output.options())
        self.units = {u.name: u for u in self.plan.units}
        self.result: MergeReport | DistSvcError | None = None
        self.manifest: Manifest | None = None
        self.recorder: _Recorder | None = None
        self.held: Callable[[], None] = lambda: None

    def reads(self) -> tuple:
        """What the workers read for this output: outputs that read alike run as one batch."""
        config = self.config
        return (tuple(map(str, config.checkpoints)), config.dtype, repr(config.tokenizer), repr(self.plan.pins()),
                tuple((u.name, u.shape, u.inputs, u.base, u.vocabulary, u.chunks, u.copied) for u in self.plan.units))

    def check(self, start: float) -> None:
        existing = Manifest.check(self.out_dir, self.plan, self.log)
        if existing is not None and _finished(existing, self.layout):
            self.result = _report(existing, self.layout, 0, True, start)

    @contextmanager
    def opened(self, start: float) -> Iterator[None]:
        """The output locked, its manifest open for this run."""
        out = output_dir(self.out_dir)
        out.mkdir()
        with out.exclusive(LOCK_NAME, self.log) as held, \
                _writing(Manifest.check(out, self.plan, self.log) or Manifest.create(out, self.plan)) as manifest:
            self.manifest, self.held = manifest, held
            if _finished(manifest, self.layout):  # finished by a run that held the lock meanwhile
                self.result = _report(manifest, self.layout, 0, True, start)
            yield

    def prepare(self) -> None:
        manifest, layout = self.manifest, self.layout
        # Files of a finished merge that changed since: their tensors are checked again.
        changed = _changed(manifest, layout) if manifest.complete else []
        manifest.set_complete(False)  # something of it is missing: repaired below
        manifest.set_failed(None)  # an earlier run's error is history once this one runs
        manifest.reset(layout.damaged(manifest.recorded, changed))
        manifest.reset(layout.prepare(manifest.recorded))

    def pending(self) -> list:
        """The units this run still has to merge (before its manifest is open: all of them)."""
        if self.result is not None:
            return []
        if self.manifest is None:
            return list(self.plan.units)
        return [u for u in self.plan.units if u.name not in self.manifest.recorded]

    def finish(self, model_card: bool, executor: Executor, start: float) -> None:
        manifest, layout, recorder = self.manifest, self.layout, self.recorder
        layout.finish(manifest.recorded, self.plan.side_files)
        report = _report(manifest, layout, recorder.count, False, start, recorder.stages, executor.describe())
        if model_card:
            _write_model_card(output_dir(self.out_dir), self.config, self.plan, report)
        manifest.set_complete(True, layout.stamps(manifest.side_files))
        self.result = report

    def failed(self, e: Exception) -> None:
        """This output's run stopped with `e`: recorded for `status`."""
        if not isinstance(self.result, DistSvcError):
            self.result = e if isinstance(e, DistSvcError) else DistSvcError(_failure(e, self.out_dir))
        with suppress(Exception):  # the storage that failed may refuse this too
            self.manifest.flush()
            self.manifest.set_failed(_failure(e, self.out_dir))


class _Dispatch:
    """Each result to its output's recorder; the progress of units that feed several outputs."""

    def __init__(self, runs: list[_Run], bar: Progress):
        self.runs, self.bar = runs, bar
        self.partial: dict[str, int] = {}  # bytes of units in flight already shown

    def progress(self, name: str, nbytes: int) -> None:
        self.partial[name] = self.partial.get(name, 0) + nbytes
        self.bar.add(nbytes)

    def __call__(self, result: UnitResult) -> None:
        run = self.runs[result.target]
        if run.result is not None:  # failed earlier in this run: its later units are not recorded
            return
        nbytes = run.manifest.units[result.name]["nbytes"]
        shown = min(self.partial.get(result.name, 0), nbytes)
        if shown:
            self.partial[result.name] -= shown
        if result.error is not None:
            run.failed(DistSvcError(result.error))
            self.bar.advance(0)
            if all(r.result is not None or r.manifest is None for r in self.runs):
                raise DistSvcError(result.error)  # nothing left to run for
            return
        run.recorder(result, nbytes - shown)


def _batched(runs: Sequence[_Run], everyone: Sequence[_Run]) -> list:
    """The units still to run, each with the outputs it feeds (`Unit.variants`: each output's own
    unit of that name), largest first (the long units start early, the short ones fill in at
    the end)."""
    from dataclasses import replace

    index = {id(run): i for i, run in enumerate(everyone)}
    names: dict[str, list] = {}
    for run in runs:
        for unit in run.pending():
            names.setdefault(unit.name, []).append((index[id(run)], unit))
    units = [replace(members[0][1], variants=tuple(members)) for members in names.values()]
    return sorted(units, key=lambda u: -u.nbytes)


def _failure(e: Exception, out_dir: Path) -> str:
    """What stopped a run, as the user was told it."""
    if isinstance(e, DistSvcError):
        return str(e)
    if isinstance(e, OSError):
        return _storage_problem(e, out_dir)
    return f"{type(e).__name__}: {e}"


def _executor(device: str | None, threads: int | None, cluster: str | None, memory_limit: str | int | None,
              log: Callable[[str], None]) -> Executor:
    from dist_svc.config import parse_size
    from dist_svc.executors import ExecutionOptions, build_executor

    memory = None if memory_limit is None else parse_size(memory_limit)
    return build_executor(cluster, ExecutionOptions(device=device, threads=threads, memory_limit=memory), log)


def _write_model_card(out, config: MergeConfig, plan: Plan, report: MergeReport) -> None:
    """README.md, written once, as one whole file (local or object storage). A card already there
    is left as it is: a rerun that repairs the output writes the same card, and a card the user
    has edited since is theirs."""
    from dist_svc.card import CARD_NAME, model_card

    if out.size(CARD_NAME) is None:
        alphas = [u.alpha for u in plan.units if u.calibrate]
        out.write(CARD_NAME, model_card(config, alphas, report.calibration_summary()).encode())


def _storage_problem(e: OSError, out_dir: Path) -> str:
    """One paragraph for a failure of the storage under a merge: what, where, and what to do."""
    where = e.filename or out_dir
    what = e.strerror or str(e)
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        hint = ("Free space (or choose another OUT_DIR), then rerun the same command: it resumes where it "
                "stopped, keeping every tensor already written.")
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = f"{out_dir} must be on storage this process may write; choose another output directory."
    elif e.errno == errno.ENOTDIR:
        hint = f"A part of the path {out_dir} is a file, not a directory; choose another output directory."
    elif e.errno == errno.ELOOP:
        hint = "The path is a symlink loop; fix the link or choose another path."
    else:
        hint = "Check the storage, then rerun the same command: it resumes where it stopped."
    return f"{where}: {what}. {hint}"


def _refuse_inside_inputs(config: MergeConfig, out_dir: Path) -> None:
    """OUT_DIR inside a model's directory would become part of that checkpoint (a zarr store
    reads nested arrays; a rerun would find its inputs changed)."""
    for path in config.checkpoints:
        if not isinstance(path, Path):  # a URL, a Hub ID or MODEL+ADAPTER
            if isinstance(out_dir, str) and (out_dir == path or out_dir.startswith(path.rstrip("/") + "/")):
                raise DistSvcError(f"{out_dir} is inside the input checkpoint {path}; choose an output location "
                                   f"outside every input.")
            continue
        if not isinstance(out_dir, Path):
            continue
        home = Path(path)
        home = home.parent if home.is_file() else home
        if out_dir == home or out_dir.is_relative_to(home):
            raise DistSvcError(f"{out_dir} is inside the input checkpoint {home}; choose an output directory "
                               f"outside every input.")


class _Recorder:
    """Takes each finished unit into the manifest and the output layout (which may seal a shard
    with it), in the driver's thread; advances the progress bar."""

    def __init__(self, manifest: Manifest, layout: OutputLayout, executor: Executor, bar: Progress,
                 held: Callable[[], None] = lambda: None):
        self.manifest, self.layout, self.bar = manifest, layout, bar
        self.held = held  # raises if this run lost the output's lock (object storage)
        self.trusted = executor.results_verified
        self.driver_syncs = executor.driver_syncs
        # Checks stored bytes where they are (a cluster's actors); without it the layout reads
        # them in this process.
        self.stored_checksums = getattr(executor, "stored_checksums", None)
        self.earlier_checked = False
        self.fresh: set[str] = set()  # recorded in this run, hashed as written: no re-reading to seal
        self.unsynced: set[str] = set()  # written but not yet durable (executor.driver_syncs)
        if self.driver_syncs:
            manifest.before_save = self._make_durable
        self.count = 0
        self.stages: dict[str, float] = {}

    def __call__(self, result: UnitResult, advance: int) -> None:
        """A finished unit: recorded; `advance`: its bytes the progress bar has not shown yet."""
        self.held()
        name = result.name
        if self.trusted:
            self.fresh.add(name)
        if self.driver_syncs:
            self.unsynced.add(name)  # before `record`, which may save and so sync
        self.manifest.record(name, result.checksum,
                             {"seconds": round(result.seconds, 4), "calibration": result.calibration})
        self.count += 1
        for stage, seconds in result.stages.items():
            self.stages[stage] = self.stages.get(stage, 0.0) + seconds
        self.bar.advance(advance)
        if self.layout.on_recorded(name):
            self.seal()

    def seal(self) -> None:
        """Seal whatever is complete, also what an earlier run recorded but left unsealed; the
        records go to disk first, so that nothing sealed is ever unrecorded."""
        self.manifest.flush()
        if self.stored_checksums is not None and not self.earlier_checked:
            self._check_earlier()
        self._redo(self.layout.seal(self.manifest.recorded, self.fresh))

    def _check_earlier(self) -> None:
        """Units an earlier run recorded are checked by the executor where the bytes are, all at
        once; those whose bytes match need no re-reading to seal (the layout reads the others
        again, and finds them damaged)."""
        self.earlier_checked = True
        recorded = self.manifest.recorded
        earlier = [name for name in recorded if name not in self.fresh]
        sizes = {name: self.manifest.units[name]["nbytes"] for name in earlier}
        stored = self.stored_checksums(self.layout, earlier, sizes)
        self.fresh.update(name for name in earlier if stored.get(name) == recorded[name])

    def _redo(self, damaged: list[str]) -> None:
        self.fresh.difference_update(damaged)
        self.manifest.reset(damaged)

    def _make_durable(self) -> None:
        self.layout.make_durable(self.unsynced)
        self.unsynced.clear()


def _run_pending(runs: list[_Run], job: Job, executor: Executor, dispatch: _Dispatch) -> None:
    """Run every unit not recorded as done by the outputs still running, each once for all of
    them; units whose bytes fail verification run again, up to MAX_ATTEMPTS passes."""
    for attempt in range(MAX_ATTEMPTS + 1):
        live = [run for run in runs if run.result is None and run.recorder is not None]
        for run in live:
            run.recorder.seal()
        pending = _batched(live, runs)
        if not pending:
            return
        if attempt == MAX_ATTEMPTS:
            raise DistSvcError(f"{live[0].layout.out_dir}: output bytes failed verification {MAX_ATTEMPTS} times; "
                               f"the disk may be failing. Check it, then rerun the same command.")
        try:
            executor.run(job, pending, dispatch, dispatch.progress)
        finally:
            for run in live:
                run.manifest.flush()  # keep what finished, whatever stopped the run


def _already_complete(config: MergeConfig, out_dir: Path, start: float) -> MergeReport | None:
    """The report of a finished merge of this config and these inputs in `out_dir`, checked
    without planning: the inputs' identities (headers hashed, not parsed) give the plan's
    fingerprint, and the output layout is rebuilt from the manifest. None for anything else:
    the full path decides (and explains a refusal)."""
    from dist_svc.plan import fingerprint, input_identities, open_inputs, plan_settings

    if output_dir(out_dir).size(MANIFEST_NAME) is None:
        return None
    try:
        manifest, layout = open_output(out_dir)
    except DistSvcError:
        return None
    if not manifest.complete or manifest.damage:
        return None
    first, rest = open_inputs(config, identity_only=True)
    try:
        inputs = input_identities([first, *rest])
    finally:
        for checkpoint in (first, *rest):
            checkpoint.close()
    if fingerprint(plan_settings(config), inputs) != manifest.data["fingerprint"] or not _finished(manifest, layout):
        return None
    return _report(manifest, layout, 0, True, start)


def _finished(manifest: Manifest, layout: OutputLayout) -> bool:
    """Complete, nothing of it missing (a damaged manifest is repaired by a run), and no file of
    it changed since it was completed (sizes and mtimes, or ETags: no byte is read)."""
    return (manifest.complete and manifest.damage is None and not _changed(manifest, layout)
            and not layout.problems(manifest.recorded, manifest.side_files, deep=False))


def _changed(manifest: Manifest, layout: OutputLayout) -> list[str]:
    """The stamps (OutputLayout.stamps) that differ from those recorded at completion."""
    now, then = layout.stamps(manifest.side_files), manifest.stamps
    return sorted(key for key in now.keys() | then.keys() if now.get(key) != then.get(key))


def plan_merge(config: MergeConfig) -> Plan:
    """The plan, from the inputs' metadata (the inputs are closed again)."""
    from dist_svc.plan import build_plan, open_inputs

    base, models = open_inputs(config)
    try:
        return build_plan(config, base, models)
    finally:
        for checkpoint in (base, *models):
            checkpoint.close()


def dry_run(config: MergeConfig | Mapping[str, Any] | str | Path, out_dir: str | Path, *, calibrate: bool | None = None,
            shard_size: str | int | None = None, output_format: str | None = None,
            device: str | None = None, workers: int = 2) -> tuple[Plan, "object", dict | None]:
    """The plan, its estimate (dist_svc.estimate) of the units still to run and what
    `out_dir` holds of it already (its progress, or None for a fresh start), without merging or
    writing anything."""
    from dist_svc.estimate import estimate
    from dist_svc.plan import build_plan, open_inputs

    config, out_dir = settle(config, out_dir, calibrate, output_format, shard_size)
    start = time.perf_counter()
    base, models = open_inputs(config)
    try:
        plan = build_plan(config, base, models)
        plan_seconds = time.perf_counter() - start  # what the merge does again before its first unit
        existing = Manifest.check(out_dir, plan)  # refuses what a real run would refuse
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        pending = [u for u in plan.units if existing is None or u.name not in existing.recorded]
        est = estimate(config, plan, base, models, device, workers, pending, plan_seconds)
    finally:
        for checkpoint in (base, *models):
            checkpoint.close()
    return plan, est, existing.progress() if existing is not None else None


def out_path(path: str | Path) -> Path | str:
    """OUT_DIR as a run uses it: a local path made absolute (symlinks resolved; a loop is a
    clear error), or a URL (an s3:// output) as it is."""
    if is_url(str(path)):
        return str(path).rstrip("/")
    return local_path(path, "OUT_DIR")


def settle(config: MergeConfig | Mapping[str, Any] | str | Path, out_dir: str | Path, calibrate: bool | None,
           output_format: str | None, shard_size: str | int | None = None) -> tuple[MergeConfig, Path]:
    """The config as this run will use it (loaded if a path, parsed if a dict of a file's
    fields; the CLI's overrides applied; the format OUT_DIR's name says (e.g. zarr for .zarr,
    dist_svc.storage.output: format_of) when neither the flag nor the config names one) and OUT_DIR as an absolute path."""
    from dist_svc.config import MergeConfig, load_config, parse_config, parse_size
    from dist_svc.storage.output import format_of

    if isinstance(config, (str, Path)):
        config = load_config(config, calibrate)
    elif isinstance(config, Mapping):
        config = parse_config(dict(config), source="the config (a dict)", calibrate=calibrate)
    elif isinstance(config, MergeConfig):
        config = config.with_calibration(calibrate)
    else:
        raise DistSvcError(f"config: expected a path to a YAML file, a dict of its fields (merge_method, "
                           f"base_model, models, ...) or a MergeConfig; got a {type(config).__name__}.")
    if output_format is None and not config.output.given:
        output_format = format_of(out_dir)
    shard_bytes = None if shard_size is None else parse_size(shard_size)
    return config.with_output(output_format, shard_size=shard_bytes), out_path(out_dir)


def open_output(out_dir: str | Path) -> tuple[Manifest, OutputLayout]:
    """The manifest of the merge in `out_dir` and its output layout, rebuilt from it."""
    out_dir = out_path(out_dir)
    manifest = Manifest.load(output_dir(out_dir))
    fmt, options = manifest.output
    return manifest, layout_for(fmt, out_dir, manifest.entries(), options)


def status(out_dir: str | Path) -> dict:
    """Progress of the merge in `out_dir`, from its manifest, and its state: "running" (a run
    holds it now), "complete", "damaged" (complete, but files are missing or changed since),
    "failed" (its last run stopped with an error: "error" holds it) or "stopped" (interrupted
    or killed)."""
    adapter = adapter_output.find(out_dir)
    if adapter is not None:  # LoRA adapters merged as one adapter (dist_svc.lowrank): no manifest
        return adapter_output.status(adapter)
    manifest, layout = open_output(out_dir)
    info = manifest.progress()
    info["format"] = layout.format
    info["details"] = layout.state() + ([f"warning: {manifest.damage} (its previous copy was read)"]
                                        if manifest.damage else [])
    running, lock = _held(output_dir(layout.out_dir))
    info["details"] += lock
    if running:
        info["state"] = "running"
    elif manifest.complete:
        info["state"] = "complete" if _finished(manifest, layout) else "damaged"
    elif manifest.failed:
        info["state"] = "failed"
        info["error"] = manifest.failed
    else:
        info["state"] = "stopped"
    return info


def verify(out_dir: str | Path, cluster: str | None = None) -> list[str]:
    """Re-read a merge's output and check it against its manifest: every tensor's bytes against
    their checksums, and every file the output must have. Returns the problems found (empty: the
    output is whole and as written). `cluster`: a Ray cluster's address (or "auto") whose actors
    read and check the tensors, spread over its nodes; this process reads only the metadata."""
    adapter = adapter_output.find(out_dir)
    if adapter is not None:  # a merge of adapters: its files against its record's checksums
        return adapter_output.problems(adapter)
    manifest, layout = open_output(out_dir)
    if cluster is None:
        problems = layout.problems(manifest.recorded, manifest.side_files, deep=True)
    else:
        problems = _checked_on(_executor(None, None, cluster, None, log=lambda line: None), manifest, layout)
    if manifest.damage:
        problems.insert(0, f"{manifest.damage} Its previous copy was read instead; rerun the same `dist-svc merge` "
                           f"command to repair it")
    if not manifest.complete:
        p = manifest.progress()
        failed = f"; its last run failed: {manifest.failed}" if manifest.failed else ""
        problems.insert(0, f"{layout.out_dir}: the merge is not finished ({p['units_done']}/{p['units_total']} "
                           f"tensors); rerun the same `dist-svc merge` command to finish it{failed}")
    return problems


def _checked_on(executor: Executor, manifest: Manifest, layout: OutputLayout) -> list[str]:
    """`problems(deep=True)`, with the tensors' bytes checked by `executor` where they are
    stored: the files' presence, sizes and headers and the side files are checked here."""
    from dist_svc.storage.output import side_file_problems

    problems = layout.problems(manifest.recorded, manifest.side_files, deep=False)
    files_whole = not problems  # else a tensor that cannot be read is in a file already named
    sizes = {name: unit["nbytes"] for name, unit in manifest.units.items()}
    stored = executor.stored_checksums(layout, list(manifest.recorded), sizes)
    for name, digest in manifest.recorded.items():
        if stored.get(name) is not None and stored[name] != digest:
            problems.append(f"{layout.out_dir}: tensor '{name}' does not match its checksum (corrupted)")
        elif stored.get(name) is None and files_whole:
            problems.append(f"{layout.out_dir}: tensor '{name}' cannot be read")
    return problems + [p for p in side_file_problems(layout.out_dir, manifest.side_files, deep=True)
                       if p not in problems]


@contextmanager
def _writing(manifest: Manifest) -> Iterator[Manifest]:
    """The manifest this run writes (under the lock): what an earlier run left half done of
    its bookkeeping is tidied first, and its journal is closed at the end."""
    manifest.remove_stale_journals()
    try:
        yield manifest
    finally:
        manifest.close()


def _held(out) -> tuple[bool, list[str]]:
    """Whether a live run holds the output's lock now, and what status says of the lock. A lock
    left by a killed run is not held: locally its `flock` died with the run; on object storage
    its lease is not renewed."""
    lease = out.lock_holder(LOCK_NAME)
    if lease is None or lease.period is None:  # none, or one that dies with its run: nothing to explain
        return lease is not None and lease.alive, []
    age = "" if lease.age is None else f" {lease.age:.0f} s ago"
    if lease.alive:
        return True, [f"lock    held: its run renewed its lease{age} (lease {lease.period:g} s)"]
    return False, [f"lock    left by a run that stopped renewing its lease{age} (lease {lease.period:g} s): "
                   f"killed, or cut off from the storage; a rerun takes the lock over"]


def _report(manifest: Manifest, layout: OutputLayout, units_run: int, already: bool, start: float,
            stages: dict[str, float] | None = None, executor: str | None = None) -> MergeReport:
    calibration = {name: u["calibration"] for name, u in manifest.units.items() if u.get("calibration")}
    return MergeReport(layout.out_dir, manifest.summary(), len(manifest.units), units_run, already,
                       time.perf_counter() - start, calibration, stages or {}, manifest.progress()["bytes_total"],
                       executor)


__all__ = ["merge", "status", "verify", "dry_run", "MergeReport", "MANIFEST_NAME"]
