"""The PEFT-adapter output of a merge of LoRA adapters (`output: {format: peft}`, dist_svc/lowrank.py):
its files, the record that says it is finished, and what `status`, `verify` and `inspect` read of it.

OUT_DIR holds adapter_model.safetensors, adapter_config.json and RECORD_NAME: the plan's
fingerprint, each file's sha256 and size, the adapter's tensor count, the plan in words and the
calibration's summary per matrix (the facts the manifest holds for a dense merge). The
directory is built under `.NAME.merging-PID` beside OUT_DIR and renamed into place with the
record in it (storage/durable.staged_directory): OUT_DIR is whole or absent; a staging directory
whose process is gone is what a killed run left. No torch here: `status` stays light.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

from dist_svc.errors import DistSvcError

RECORD_NAME = "dist-svc-adapter-merge.json"  # the fingerprint and checksums of a finished adapter merge
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FILES = (WEIGHTS_NAME, CONFIG_NAME)
STAGE = "merging"  # staging directories are .NAME.merging-PID


def write(out_dir: Path, files: dict[str, bytes], record: dict) -> None:
    """OUT_DIR with `files` and the record (`record` plus the files' checksums and sizes), whole
    or not at all; each file read back against its checksum before the rename."""
    from dist_svc.storage.durable import atomic_write, staged_directory

    record = {**record, "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
              "sizes": {name: len(data) for name, data in files.items()}}
    for leftover in _staged(out_dir):  # what a killed run left
        if not _alive(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
    with staged_directory(out_dir, STAGE) as tmp:
        for name, data in files.items():
            atomic_write(tmp / name, data)
        for name, digest in record["files"].items():  # read back what the disk holds
            if _sha256(tmp / name) != digest:
                raise DistSvcError(f"{tmp / name}: reads back differently from what was written; the storage is "
                                   f"not reliable.")
        atomic_write(tmp / RECORD_NAME, json.dumps(record, indent=2).encode())


def find(out_dir: str | Path) -> Path | None:
    """OUT_DIR as a local path when it holds a merge of adapters (finished, damaged, or being
    written beside it) and no dense merge; None otherwise."""
    from dist_svc.manifest import MANIFEST_NAME
    from dist_svc.storage.durable import local_path
    from dist_svc.storage.location import is_url

    if is_url(str(out_dir)):
        return None  # a merge of adapters is written to a local directory only
    path = local_path(out_dir, "OUT_DIR")
    if (path / MANIFEST_NAME).exists():
        return None
    if (path / RECORD_NAME).exists() or (path / CONFIG_NAME).exists() or (not path.exists() and _staged(path)):
        return path
    return None


def finished(out_dir: Path, fingerprint: str) -> bool:
    """OUT_DIR holds the finished merge of this fingerprint, every file as written."""
    record = read_record(out_dir)
    return isinstance(record, dict) and record.get("fingerprint") == fingerprint and not problems(out_dir)


def problems(out_dir: Path) -> list[str]:
    """What keeps OUT_DIR from being a finished merge of adapters as written, every file re-read
    against its checksum (empty: verified)."""
    if not out_dir.exists():
        running = any(_alive(p) for p in _staged(out_dir))
        state = "a run is writing it" if running else "its run stopped before writing it"
        return [f"{out_dir}: the merge of adapters is not finished ({state}; it is written whole, at the end); "
                f"{'wait for it' if running else 'rerun the same `dist-svc merge` command'}"]
    record = read_record(out_dir)
    if record is None:
        return [f"{out_dir / RECORD_NAME} is missing: this is not a finished dist-svc merge of adapters (it writes "
                f"that record last, with the files' checksums), so nothing vouches for its files"]
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not isinstance(record.get("fingerprint"), str) or not set(FILES) <= set(files):
        return [f"{out_dir / RECORD_NAME}: the record is damaged (it must name the fingerprint and the checksums "
                f"of {' and '.join(FILES)})"]
    found = []
    for name in FILES:
        path, digest = out_dir / name, files[name]
        if not path.is_file():
            found.append(f"{path} is missing")
        elif _sha256(path) != digest:
            found.append(f"{path}: its bytes differ from the checksum recorded when it was written (sha256 {digest})")
    return found


def status(out_dir: Path) -> dict:
    """The merge of adapters in OUT_DIR in `driver.status`'s terms: a state, the adapter's
    tensors and bytes (done when the output is there), a hint, details. Checks sizes, not
    checksums (`verify` re-reads)."""
    if not out_dir.exists():
        running = any(_alive(p) for p in _staged(out_dir))
        return {"state": "running" if running else "stopped", "format": "peft", "units_done": 0, "units_total": 0,
                "bytes_done": 0, "bytes_total": 0,
                "details": [f"a merge of adapters is written whole at its end (under {p.name} until then)"
                            for p in _staged(out_dir)]}
    record = read_record(out_dir)
    facts = record if isinstance(record, dict) else {}
    files = facts.get("files") if isinstance(facts.get("files"), dict) else {}
    sizes = facts.get("sizes") if isinstance(facts.get("sizes"), dict) else {}
    damaged = []
    if record is None:
        damaged.append(f"{RECORD_NAME} is missing: not a finished dist-svc merge of adapters")
    elif not set(FILES) <= set(files):
        damaged.append(f"{RECORD_NAME} is damaged")
    for name in set(FILES) & set(files):
        path = out_dir / name
        if not path.is_file():
            damaged.append(f"{name} is missing")
        elif isinstance(sizes.get(name), int) and path.stat().st_size != sizes[name]:
            damaged.append(f"{name} has changed size since it was written")
    tensors = facts.get("tensors")
    if not isinstance(tensors, int):
        tensors = _tensor_count(out_dir / WEIGHTS_NAME)
    total = sum(p.stat().st_size for p in map(out_dir.joinpath, FILES) if p.is_file())
    details = [facts["plan"]] if isinstance(facts.get("plan"), str) else []
    info = {"format": "peft", "units_total": tensors, "bytes_total": total, "details": details + damaged}
    if record is None:
        done = 0
        info.update(state="damaged", hint="  (adapter files without dist-svc's record: not written by dist-svc, or "
                                          "the record was lost; nothing vouches for them)")
    elif damaged:
        done = 0
        info.update(state="damaged", hint="  (delete it and rerun the same `dist-svc merge` command: a merge of "
                                          "adapters is written again whole, in seconds)")
    else:
        done = tensors
        info.update(state="complete")
    return {**info, "units_done": done, "bytes_done": total if done else 0}


def calibration(out_dir: Path) -> dict[str, dict]:
    """The calibration's summary per matrix, as the finished merge recorded it (tensor -> the
    summary, plus its "shape" when recorded); a clear error when there is none to show."""
    problem = problems(out_dir)
    if problem:
        raise DistSvcError(f"{problem[0]}. `dist-svc inspect` reads a finished merge of adapters.")
    record = read_record(out_dir)
    recorded = record.get("calibration") or {}
    if not isinstance(recorded, dict) or not all(isinstance(c, dict) and "sigma_before" in c for c in recorded.values()):
        raise DistSvcError(f"{out_dir / RECORD_NAME}: its calibration summaries are damaged; nothing to inspect.")
    if not recorded:
        raise DistSvcError(f"{out_dir}: a finished merge of LoRA adapters ({status(out_dir)['units_total']} adapter "
                           f"tensors), merged with calibration off: its record holds no calibration to inspect. "
                           f"`dist-svc status` and `verify` describe it; merge with calibration on to compare.")
    shapes = record.get("shapes") if isinstance(record.get("shapes"), dict) else {}
    return {name: {**summary, "shape": shapes.get(name)} for name, summary in recorded.items()}


def read_record(out_dir: Path):
    """The record's JSON as it is (None when absent; {} when unreadable): check what you use."""
    try:
        return json.loads((out_dir / RECORD_NAME).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _staged(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.{STAGE}-*") if p.is_dir())


def _alive(staged: Path) -> bool:
    """The process that owns a staging directory (its name ends in its PID) is running."""
    try:
        pid = int(staged.name.rsplit("-", 1)[1])
    except ValueError:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tensor_count(path: Path) -> int:
    """Tensors in a safetensors file, from its header (0 when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        return sum(1 for key in header if key != "__metadata__")
    except (OSError, ValueError, struct.error):
        return 0
