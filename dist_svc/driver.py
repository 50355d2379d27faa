"""The story of a merge run: config -> plan -> manifest -> executor -> sealed shards -> index.

`merge()` is the Python API and what `dist-svc merge` calls. Rerunning it on the same output
directory resumes: finished units are skipped, and the bytes equal an uninterrupted run's.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from dist_svc.config import MergeConfig, load_config
from dist_svc.errors import DistSvcError
from dist_svc.executors import LocalExecutor
from dist_svc.manifest import LOCK_NAME, MANIFEST_NAME, Manifest
from dist_svc.plan import DEFAULT_SHARD_BYTES, Plan, build_plan, open_inputs, parse_size
from dist_svc.progress import Progress
from dist_svc.storage.safetensors_reader import INDEX_NAME
from dist_svc.storage.hf_output import (
    copy_side_files, create_partial, partial_path, range_sha256, seal_shard, sync_file, write_index,
)
from dist_svc.storage.zarr_store import array_sha256, create_array, create_group, is_zarr
from dist_svc.worker import Job, UnitResult

MAX_ATTEMPTS = 3  # passes over units whose bytes failed verification before giving up


@dataclass
class MergeReport:
    out_dir: Path
    plan_summary: str
    units_total: int
    units_run: int
    already_complete: bool
    seconds: float
    calibration: dict[str, dict] = field(default_factory=dict)  # tensor -> calibration summary


def merge(config: MergeConfig | str | Path, out_dir: str | Path, *, calibrate: bool | None = None,
          shard_size: str | int = DEFAULT_SHARD_BYTES, executor=None, progress: str = "auto",
          output_format: str | None = None, log: Callable[[str], None] = lambda line: None) -> MergeReport:
    """Merge into `out_dir`, resuming whatever an earlier run finished. The output is HF
    safetensors shards, or a zarr v3 store when `output_format` (else the config's `output:`,
    else an `out_dir` ending in .zarr) says so."""
    start = time.perf_counter()
    config, out_dir = _settle(config, out_dir, calibrate, output_format)
    zarr_out = config.output.format == "zarr"
    executor = executor or LocalExecutor()

    base, models = open_inputs(config)
    plan = build_plan(config, base, models, parse_size(shard_size))
    base.close()
    for m in models:
        m.close()
    log(f"plan: {plan.summary()}, K={config.k}, method {config.merge_method}, "
        f"calibration {'on' if config.calibration.enabled else 'off'}")

    existing = Manifest.check(out_dir, plan)  # refusals first, before anything is written
    if existing is not None and existing.complete and _output_present(out_dir, existing, zarr_out):
        return _report(out_dir, plan, existing, 0, True, start)
    connect = getattr(executor, "connect", None)
    if connect is not None:  # a cluster that cannot be reached is refused before anything is written too
        connect()
    out_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir):
        manifest = Manifest.open_for(out_dir, plan)
        if manifest.complete:
            if _output_present(out_dir, manifest, zarr_out):  # finished by a run that held the lock meanwhile
                return _report(out_dir, plan, manifest, 0, True, start)
            manifest.data["complete"] = False  # a shard was deleted: merge its tensors again
        if zarr_out:
            _prepare_zarr(out_dir, plan, manifest, config.output.compression)
        else:
            _recover_shards(out_dir, plan, manifest)
        job = Job(config, out_dir, tuple(partial_path(out_dir, s) for s in plan.shards))
        p = manifest.progress()
        bar = Progress(p["bytes_total"], p["units_total"], p["bytes_done"], p["units_done"], mode=progress)
        units_run = 0
        # Units reported in this run by an executor that verified them need no re-reading at
        # sealing; units recorded by an earlier run are verified before their shard is sealed.
        fresh: set[str] = set()
        trust_fresh = getattr(executor, "results_verified", False)
        driver_syncs = getattr(executor, "driver_syncs", False) and not zarr_out  # zarr writers sync themselves
        unsynced: set[int] = set()  # shards written to since the manifest was last saved

        def sync_shards() -> None:
            for k in sorted(unsynced):
                partial = partial_path(out_dir, plan.shards[k])
                if partial.exists():  # a sealed shard was synced when it was sealed
                    sync_file(partial)
            unsynced.clear()

        if driver_syncs:
            manifest.before_save = sync_shards
        try:
            for attempt in range(MAX_ATTEMPTS + 1):
                # Largest first: the long units start early, the short ones fill in at the end.
                pending = sorted((u for u in plan.units if not manifest.units[u.name]["done"]),
                                 key=lambda u: -u.nbytes)
                if not pending:
                    break
                if attempt == MAX_ATTEMPTS:
                    raise DistSvcError(f"{out_dir}: output bytes failed verification {MAX_ATTEMPTS} times; "
                                       f"the disk may be failing. Check it, then rerun the same command.")

                def on_result(result: UnitResult) -> None:
                    nonlocal units_run
                    unit = manifest.units[result.name]
                    if trust_fresh:
                        fresh.add(result.name)
                    if driver_syncs:  # before `record`, which may save and so sync
                        unsynced.add(unit["shard"])
                    manifest.record(result.name, result.sha256,
                                    {"seconds": round(result.seconds, 4), "calibration": result.calibration})
                    units_run += 1
                    bar.advance(unit["nbytes"])
                    if not zarr_out:
                        _seal_if_complete(out_dir, plan, manifest, unit["shard"], fresh)

                try:
                    executor.run(job, pending, on_result)
                finally:
                    manifest.flush()  # keep what finished, whatever stopped the run
                for k in range(len(plan.shards) if not zarr_out else 0):
                    _seal_if_complete(out_dir, plan, manifest, k, fresh)
        finally:
            bar.close()

        if not zarr_out:
            dtypes = {name: u["dtype"] for name, u in manifest.units.items()}
            shapes = {name: tuple(u["shape"]) for name, u in manifest.units.items()}
            write_index(out_dir, list(plan.shards), dtypes, shapes)
        copy_side_files(config.base_model, out_dir, config.out_dtype)
        manifest.mark_complete()
        (out_dir / LOCK_NAME).unlink(missing_ok=True)
        return _report(out_dir, plan, manifest, units_run, False, start)


def dry_run(config: MergeConfig | str | Path, out_dir: str | Path, *, calibrate: bool | None = None,
            shard_size: str | int = DEFAULT_SHARD_BYTES, output_format: str | None = None,
            device: str | None = None, workers: int = 2) -> tuple[Plan, "object", dict | None]:
    """The plan, its estimate (dist_svc.estimate) and what `out_dir` holds of it already (its
    progress, or None for a fresh start), without merging or writing anything."""
    from dist_svc.estimate import estimate

    config, out_dir = _settle(config, out_dir, calibrate, output_format)
    base, models = open_inputs(config)
    try:
        plan = build_plan(config, base, models, parse_size(shard_size))
        existing = Manifest.check(out_dir, plan)  # refuses what a real run would refuse
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        est = estimate(config, plan, base, models, device, workers)
    finally:
        base.close()
        for m in models:
            m.close()
    return plan, est, existing.progress() if existing is not None else None


def _settle(config: MergeConfig | str | Path, out_dir: str | Path, calibrate: bool | None,
            output_format: str | None) -> tuple[MergeConfig, Path]:
    """The config as this run will use it (loaded if a path; the CLI's overrides applied; zarr
    output when OUT_DIR ends in .zarr and neither the flag nor the config says otherwise) and
    OUT_DIR as an absolute path."""
    if isinstance(config, (str, Path)):
        config = load_config(config, calibrate)
    else:
        config = config.with_calibration(calibrate)
    if output_format is None and not config.output.given and is_zarr(out_dir):
        output_format = "zarr"
    return config.with_output_format(output_format), Path(out_dir).expanduser().resolve()


def status(out_dir: str | Path) -> dict:
    """Progress of the merge in `out_dir`, from its manifest, and whether a run holds it now."""
    out_dir = Path(out_dir).expanduser().resolve()
    manifest = Manifest.load(out_dir)
    info = manifest.progress()
    info["format"] = "zarr" if _is_zarr_output(manifest) else "safetensors"
    if manifest.complete:
        info["state"] = "complete"
    else:
        info["state"] = "running" if _is_locked(out_dir) else "stopped"
    return info


def verify(out_dir: str | Path) -> list[str]:
    """Re-read a merge's output and check it against its manifest: every sealed shard's header is
    the planned one and every tensor's bytes match their sha256; the index maps every tensor to
    its shard. Returns the problems found (empty: the output is as written)."""
    out_dir = Path(out_dir).expanduser().resolve()
    manifest = Manifest.load(out_dir)
    problems = []
    if _is_zarr_output(manifest):
        for name, unit in manifest.units.items():
            if unit["done"] and array_sha256(out_dir, name) != unit["sha256"]:
                problems.append(f"{out_dir / name}: tensor '{name}' does not match its checksum "
                                f"(corrupted, truncated or missing chunks)")
        return problems
    for k, shard in enumerate(manifest.shards):
        path = out_dir / shard["file"]
        if not shard["done"]:
            continue
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        if path.stat().st_size != shard["size"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, planned {shard['size']} (truncated or extended)")
            continue
        for name in shard["tensors"]:
            unit = manifest.units[name]
            if range_sha256(path, unit["offset"], unit["nbytes"]) != unit["sha256"]:
                problems.append(f"{path}: tensor '{name}' does not match its checksum (corrupted)")
    if manifest.complete:
        try:
            index = json.loads((out_dir / INDEX_NAME).read_text())["weight_map"]
        except (OSError, ValueError, KeyError):
            problems.append(f"{out_dir / INDEX_NAME}: missing or unreadable")
        else:
            for name, unit in manifest.units.items():
                if index.get(name) != manifest.shards[unit["shard"]]["file"]:
                    problems.append(f"{out_dir / INDEX_NAME}: tensor '{name}' is not mapped to its shard")
    return problems


def _is_zarr_output(manifest: Manifest) -> bool:
    return manifest.data["settings"]["config"].get("output", {}).get("format") == "zarr"


def _output_present(out_dir: Path, manifest: Manifest, zarr_out: bool) -> bool:
    if zarr_out:
        return (out_dir / "zarr.json").is_file() and all((out_dir / n / "zarr.json").is_file() for n in manifest.units)
    return _shards_present(out_dir, manifest)


def _prepare_zarr(out_dir: Path, plan: Plan, manifest: Manifest, compression: str) -> None:
    """The store's group and every array's metadata, before any worker writes; on a resume,
    the bytes of each unit an earlier run finished are checked, and a unit that does not match
    (a lost or corrupted chunk) is run again."""
    create_group(out_dir, [u.name for u in plan.units])
    for unit in plan.units:
        create_array(out_dir, unit.name, unit.shape, unit.out_dtype, compression)
    bad = [u.name for u in plan.units if manifest.units[u.name]["done"]
           and array_sha256(out_dir, u.name) != manifest.units[u.name]["sha256"]]
    if bad:
        manifest.reset(bad)


def _shards_present(out_dir: Path, manifest: Manifest) -> bool:
    return all((out_dir / s["file"]).is_file() and (out_dir / s["file"]).stat().st_size == s["size"]
               for s in manifest.shards)


def _recover_shards(out_dir: Path, plan: Plan, manifest: Manifest) -> None:
    """Bring each shard's files in line with the manifest after whatever stopped the last run.

    A shard sealed (final name) but not yet recorded goes back to `.partial` to be verified and
    sealed again; a partial that is missing or not of the planned header and size is recreated,
    and its units are run again.
    """
    for k, shard in enumerate(plan.shards):
        final, partial = out_dir / shard.file, partial_path(out_dir, shard)
        names = list(shard.tensors)
        if manifest.shards[k]["done"]:
            if final.is_file() and final.stat().st_size == shard.size:
                continue
            manifest.mark_shard(k, False)  # the sealed shard went missing: make it again
        if final.exists() and not partial.exists():
            os.replace(final, partial)
        if not _partial_ok(partial, shard):
            create_partial(partial, shard)
            manifest.reset(n for n in names if manifest.units[n]["done"])


def _partial_ok(path: Path, shard) -> bool:
    try:
        if path.stat().st_size != shard.size:
            return False
        with open(path, "rb") as f:
            return f.read(len(shard.header)) == shard.header
    except FileNotFoundError:
        return False


def _seal_if_complete(out_dir: Path, plan: Plan, manifest: Manifest, k: int, fresh: set[str]) -> None:
    """Seal shard k once all its units are done and the bytes of those not in `fresh` match
    their checksums; units whose bytes do not match are reset, to be run again."""
    if manifest.shards[k]["done"]:
        return
    shard = plan.shards[k]
    units = [manifest.units[n] for n in shard.tensors]
    if not all(u["done"] for u in units):
        return
    partial = partial_path(out_dir, shard)
    bad = [n for n, u in zip(shard.tensors, units)
           if n not in fresh and range_sha256(partial, u["offset"], u["nbytes"]) != u["sha256"]]
    if bad:
        manifest.reset(bad)
        return
    seal_shard(partial, out_dir / shard.file)
    manifest.mark_shard(k, True)


@contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """One run per output directory; the lock dies with its process (kill -9 included)."""
    fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DistSvcError(f"another dist-svc run is merging into {out_dir}; wait for it to finish "
                               f"(see `dist-svc status {out_dir}`).") from None
        yield
    finally:
        os.close(fd)


def _is_locked(out_dir: Path) -> bool:
    try:
        fd = os.open(out_dir / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _report(out_dir: Path, plan: Plan, manifest: Manifest, units_run: int, already: bool, start: float) -> MergeReport:
    calibration = {name: u["calibration"] for name, u in manifest.units.items() if u.get("calibration")}
    return MergeReport(out_dir, plan.summary(), len(plan.units), units_run, already,
                       time.perf_counter() - start, calibration)


__all__ = ["merge", "status", "verify", "MergeReport", "MANIFEST_NAME"]
