"""The manifest: the plan plus each unit's status and checksum, in the output directory.

Only the driver writes it, and every write replaces the whole file atomically (temp + fsync +
rename), so a crash at any instant leaves either the previous or the next state. A unit is
recorded as done only after its bytes are durable (the worker fsynced them, or `before_save`
does before the manifest says so); its sha256 is what sealing, resuming and `verify` check
those bytes against.

Finished units are saved at most every `SAVE_EVERY` seconds (and when a unit is reset, and at
the end): rewriting the whole file after each of thousands of small tensors would cost more
than the merge. A crash loses at most the last few seconds of records; those units are simply
run again, with the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from dist_svc import __version__
from dist_svc.errors import DistSvcError
from dist_svc.plan import Plan
from dist_svc.storage.durable import atomic_write, temp_path
from dist_svc.storage.types import MANIFEST_NAME

LOCK_NAME = ".dist-svc.lock"
FORMAT = 2
SAVE_EVERY = 2.0  # seconds


class Manifest:
    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data
        self.damage: str | None = None  # why the manifest itself was unusable (its previous copy is in use)
        # name -> sha256 of every unit recorded as done: what layouts check stored bytes against.
        self.recorded: dict[str, str] = {n: u["sha256"] for n, u in data["units"].items() if u["done"]}
        self._saved_at = time.monotonic()
        self._dirty = False
        # Called before every save: whatever must be durable before the manifest says so.
        self.before_save: Callable[[], None] = lambda: None

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def load(cls, out_dir: Path, log: Callable[[str], None] = lambda line: None) -> "Manifest":
        """The manifest in `out_dir`. If it is damaged (edited by hand, or its disk lost bits), its
        previous copy (kept at every save) is used: what was recorded since is run again."""
        path = out_dir / MANIFEST_NAME
        if not path.exists() and not prev_path(path).exists():
            raise DistSvcError(f"{out_dir}: no dist-svc merge here ({MANIFEST_NAME} is missing).")
        try:
            return cls(path, _read(path))
        except DistSvcError as damage:
            try:
                manifest = cls(path, _read(prev_path(path)))
            except DistSvcError:
                raise DistSvcError(f"{damage} Its previous copy is unusable too, so what this directory holds "
                                   f"cannot be trusted: delete {out_dir} to start over.") from None
            manifest.damage = str(damage)
            log(f"warning: {damage} Using its previous copy; tensors recorded since then are merged again.")
            return manifest

    @classmethod
    def check(cls, out_dir: Path, plan: Plan, log: Callable[[str], None] = lambda line: None) -> "Manifest | None":
        """Read-only: this plan's manifest in `out_dir` if it is the same merge, None if the
        directory is new or empty; refused (nothing touched) if it holds anything else."""
        manifest_path = out_dir / MANIFEST_NAME
        if manifest_path.exists() or prev_path(manifest_path).exists():
            manifest = cls.load(out_dir, log)
            if manifest.data["fingerprint"] != plan.fingerprint:
                raise DistSvcError(
                    f"{out_dir} holds a different merge ({manifest.explain_mismatch(plan)}). Nothing was changed. "
                    f"Use a new output directory, or delete {out_dir} to start this merge over.")
            return manifest
        if out_dir.exists() and not out_dir.is_dir():
            raise DistSvcError(f"{out_dir} exists and is not a directory. Choose another output directory.")
        ours = {LOCK_NAME, temp_path(manifest_path).name}  # a first save killed midway
        others = [p.name for p in out_dir.iterdir() if p.name not in ours] if out_dir.exists() else []
        if others:
            raise DistSvcError(
                f"{out_dir} is not empty and holds no dist-svc merge (found {', '.join(sorted(others)[:3])}"
                f"{', ...' if len(others) > 3 else ''}). Nothing was changed. Choose a new or empty output directory.")
        return None

    @classmethod
    def create(cls, out_dir: Path, plan: Plan) -> "Manifest":
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

    # -- what it describes -----------------------------------------------------------------------

    @property
    def units(self) -> dict[str, dict]:
        return self.data["units"]

    @property
    def complete(self) -> bool:
        return self.data["complete"]

    @property
    def output(self) -> tuple[str, dict]:
        """The output's format and layout options, as the plan chose them."""
        spec = dict(self.data["settings"]["config"]["output"])
        return spec.pop("format"), spec

    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of every output tensor, in plan order (Plan.entries)."""
        return [(name, u["dtype"], tuple(u["shape"])) for name, u in self.units.items()]

    @property
    def side_files(self) -> dict[str, str]:
        """Side file -> sha256 of the bytes the output gets."""
        return self.data["side_files"]

    # -- changes -------------------------------------------------------------------------------

    def record(self, name: str, sha256: str, info: dict[str, Any]) -> None:
        """Mark a unit done; saved within SAVE_EVERY seconds (see the module's docstring)."""
        self.units[name].update(done=True, sha256=sha256, **info)
        self.recorded[name] = sha256
        self._dirty = True
        if time.monotonic() - self._saved_at >= SAVE_EVERY:
            self.save()

    def reset(self, names: Iterable[str]) -> None:
        """Units whose bytes are gone or wrong: not done, saved at once."""
        names = list(names)
        for name in names:
            self.units[name].update(done=False, sha256=None)
            self.recorded.pop(name, None)
        if names:
            self.save()

    def set_complete(self, complete: bool) -> None:
        if self.data["complete"] != complete:
            self.data["complete"] = complete
            self.save()

    def flush(self) -> None:
        if self._dirty:
            self.save()

    def progress(self) -> dict[str, int]:
        units = self.units.values()
        return {
            "units_done": len(self.recorded),
            "units_total": len(self.units),
            "bytes_done": sum(u["nbytes"] for u in units if u["done"]),
            "bytes_total": sum(u["nbytes"] for u in units),
        }

    def save(self) -> None:
        """Atomically replace the manifest, keeping the one it replaces as its previous copy."""
        self.before_save()
        if self.path.exists() and self.damage is None:
            keep = temp_path(prev_path(self.path))
            keep.unlink(missing_ok=True)
            os.link(self.path, keep)
            os.replace(keep, prev_path(self.path))  # made durable by atomic_write's fsync of the directory
        atomic_write(self.path, json.dumps(self.data, separators=(",", ":")).encode())
        self.damage = None
        self._saved_at = time.monotonic()
        self._dirty = False


def prev_path(path: Path) -> Path:
    """Where the manifest's previous copy is kept."""
    return path.with_name(f".{path.name}.prev")


_UNIT_KEYS = {"shape": list, "dtype": str, "nbytes": int, "done": bool}


def _is(value: Any, kind: type) -> bool:
    """isinstance, except that a bool is not an int here (JSON true is not a byte count)."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _read(path: Path) -> dict[str, Any]:
    """A manifest's data, checked for everything the driver, status and verify rely on."""
    def damaged(problem: str) -> DistSvcError:
        return DistSvcError(f"{path}: the manifest is damaged ({problem}).")

    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise damaged("missing") from None
    except (OSError, ValueError, RecursionError) as e:
        raise damaged(f"unreadable: {str(e)[:100]}") from None
    if not isinstance(data, dict):
        raise damaged("not a JSON object")
    if data.get("format") != FORMAT:
        raise DistSvcError(f"{path}: manifest format {str(data.get('format'))[:20]} is not one this dist-svc "
                           f"({__version__}) reads; finish the merge with the dist-svc that started it.")
    for key, kind in (("fingerprint", str), ("settings", dict), ("inputs", dict), ("side_files", dict),
                      ("complete", bool), ("units", dict)):
        if not isinstance(data.get(key), kind):
            raise damaged(f"'{key}' is missing or not a {kind.__name__}")
    output = data["settings"].get("config", {}).get("output") if isinstance(data["settings"].get("config"), dict) else None
    if not isinstance(output, dict) or not isinstance(output.get("format"), str):
        raise damaged("'settings.config.output' is missing")
    for name, unit in data["units"].items():
        if not isinstance(unit, dict) or not all(_is(unit.get(k), t) for k, t in _UNIT_KEYS.items()):
            raise damaged(f"unit '{name[:80]}' lacks one of {', '.join(_UNIT_KEYS)}")
        if unit["done"] and not isinstance(unit.get("sha256"), str):
            raise damaged(f"unit '{name[:80]}' is done but has no sha256")
    return data


def _initial(plan: Plan) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": __version__,
        "fingerprint": plan.fingerprint,
        "settings": plan.settings,
        "inputs": plan.inputs,
        "side_files": {name: hashlib.sha256(data).hexdigest() for name, data in plan.side_files.items()},
        "complete": False,
        "units": {
            u.name: {"shape": list(u.shape), "dtype": u.out_dtype, "calibrate": u.calibrate, "nbytes": u.nbytes,
                     "merged_with": u.merged_with(), "done": False, "sha256": None}
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
