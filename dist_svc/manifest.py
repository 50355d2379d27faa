"""The manifest: the plan plus each unit's status and checksum, in the output directory.

Only the driver writes it, and every write replaces the whole file atomically (temp + fsync +
rename), so a crash at any instant leaves either the previous or the next state. A unit is
recorded as done only after its worker has written and fsynced its bytes; its sha256 is what
sealing the shard, resuming and `verify` check those bytes against.

Finished units are saved at most every `SAVE_EVERY` seconds (and whenever a shard is sealed,
and at the end): rewriting the whole file after each of thousands of small tensors would cost
more than the merge. A crash loses at most the last few seconds of records; those units are
simply run again, with the same bytes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from dist_svc import __version__
from dist_svc.errors import DistSvcError
from dist_svc.plan import Plan
from dist_svc.storage.hf_output import atomic_write

MANIFEST_NAME = "dist-svc-manifest.json"
LOCK_NAME = ".dist-svc.lock"
FORMAT = 1
SAVE_EVERY = 2.0  # seconds


class Manifest:
    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data
        self._saved_at = time.monotonic()
        self._dirty = False
        # Called before every save: whatever must be durable before the manifest says so.
        self.before_save: Callable[[], None] = lambda: None

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def load(cls, out_dir: Path) -> "Manifest":
        path = out_dir / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DistSvcError(f"{out_dir}: no dist-svc merge here ({MANIFEST_NAME} is missing).") from None
        except (OSError, ValueError) as e:
            raise DistSvcError(f"{path}: unreadable manifest ({e}). Delete the directory to start over.") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DistSvcError(f"{path}: manifest format {data.get('format') if isinstance(data, dict) else '?'} "
                               f"is not one this dist-svc ({__version__}) reads.")
        return cls(path, data)

    @classmethod
    def check(cls, out_dir: Path, plan: Plan) -> "Manifest | None":
        """Read-only: this plan's manifest in `out_dir` if it is the same merge, None if the
        directory is new or empty; refused (nothing touched) if it holds anything else."""
        if (out_dir / MANIFEST_NAME).exists():
            manifest = cls.load(out_dir)
            if manifest.data["fingerprint"] != plan.fingerprint:
                raise DistSvcError(
                    f"{out_dir} holds a different merge ({manifest.explain_mismatch(plan)}). Nothing was changed. "
                    f"Use a new output directory, or delete {out_dir} to start this merge over.")
            return manifest
        if out_dir.exists() and not out_dir.is_dir():
            raise DistSvcError(f"{out_dir} exists and is not a directory. Choose another output directory.")
        others = [p.name for p in out_dir.iterdir() if p.name != LOCK_NAME] if out_dir.exists() else []
        if others:
            raise DistSvcError(
                f"{out_dir} is not empty and holds no dist-svc merge (found {', '.join(sorted(others)[:3])}"
                f"{', ...' if len(others) > 3 else ''}). Nothing was changed. Choose a new or empty output directory.")
        return None

    @classmethod
    def open_for(cls, out_dir: Path, plan: Plan) -> "Manifest":
        """This plan's manifest in `out_dir`, resumed if it exists, else created."""
        manifest = cls.check(out_dir, plan)
        if manifest is None:
            manifest = cls(out_dir / MANIFEST_NAME, _initial(plan))
            manifest.save()
        return manifest

    def explain_mismatch(self, plan: Plan) -> str:
        old_settings, old_inputs = self.data["settings"], self.data["inputs"]
        diffs = _diff(old_settings, plan.settings, "")
        if diffs:
            diffs.sort(key=lambda d: not d[0].endswith("enabled"))  # the switch before its options
            said = "; ".join(f"'{key}' was {json.dumps(old)}, now {json.dumps(new)}" for key, old, new in diffs[:3])
            return said + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        for model, files in plan.inputs.items():
            if model not in old_inputs:
                return f"input {model} was not part of it"
            if files != old_inputs[model]:
                return f"the files of input {model} changed since it started"
        if self.data.get("version") != __version__:
            return f"it was started by dist-svc {self.data.get('version')}, this is {__version__}"
        return "its plan differs"

    # -- state ---------------------------------------------------------------------------------

    @property
    def units(self) -> dict[str, dict]:
        return self.data["units"]

    @property
    def shards(self) -> list[dict]:
        return self.data["shards"]

    @property
    def complete(self) -> bool:
        return self.data["complete"]

    def pending(self) -> list[str]:
        return [name for name, u in self.units.items() if not u["done"]]

    def record(self, name: str, sha256: str, info: dict[str, Any]) -> None:
        """Mark a unit done; saved within SAVE_EVERY seconds (see the module's docstring)."""
        unit = self.units[name]
        unit.update(done=True, sha256=sha256, **info)
        self._dirty = True
        if time.monotonic() - self._saved_at >= SAVE_EVERY:
            self.save()

    def flush(self) -> None:
        if self._dirty:
            self.save()

    def reset(self, names: Iterable[str]) -> None:
        for name in names:
            self.units[name].update(done=False, sha256=None)
        self.save()

    def mark_shard(self, index: int, done: bool) -> None:
        self.shards[index]["done"] = done
        self.save()

    def mark_complete(self) -> None:
        self.data["complete"] = True
        self.save()

    def progress(self) -> dict[str, int]:
        units = self.units.values()
        return {
            "units_done": sum(u["done"] for u in units),
            "units_total": len(self.units),
            "bytes_done": sum(u["nbytes"] for u in units if u["done"]),
            "bytes_total": sum(u["nbytes"] for u in units),
            "shards_done": sum(s["done"] for s in self.shards),
            "shards_total": len(self.shards),
        }

    def save(self) -> None:
        self.before_save()
        atomic_write(self.path, json.dumps(self.data, separators=(",", ":")).encode())
        self._saved_at = time.monotonic()
        self._dirty = False


def _initial(plan: Plan) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": __version__,
        "fingerprint": plan.fingerprint,
        "settings": plan.settings,
        "inputs": plan.inputs,
        "complete": False,
        "shards": [{"file": s.file, "size": s.size, "tensors": list(s.tensors), "done": False} for s in plan.shards],
        "units": {
            u.name: {"shape": list(u.shape), "dtype": u.out_dtype, "calibrate": u.calibrate,
                     "shard": u.place.shard, "offset": u.place.offset, "nbytes": u.nbytes,
                     "done": False, "sha256": None}
            for u in plan.units
        },
    }


def _diff(old: Any, new: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if old == new else [(prefix.removeprefix("config."), old, new)]
