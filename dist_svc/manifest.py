"""The manifest: the plan plus each unit's status and checksum, in the output directory.

It is a snapshot (`dist-svc-manifest.json`: the plan, and the state when it was written) and a
journal beside it (`.dist-svc-manifest.G.journal`, G the snapshot's generation): every change
after the snapshot is one appended line, so recording a finished unit costs O(1), whatever the
size of the model. Only the driver writes either, and reading them back is O(units + records).

On object storage (an s3:// OUT_DIR, dist_svc.storage.outdir) the snapshot is an object and the
journal a series of objects, one per save (`.dist-svc-manifest.G.journal.00000007`), each
created only if absent: a second run writing the same merge fails at its first write instead of
interleaving records, and every new snapshot is conditional on the one it replaces.

Durability: a unit counts as done once its journal line is on disk, and that line is written
only after the unit's bytes are durable (`before_save` makes them so first). Records are
appended in batches, at most every `SAVE_EVERY` seconds, before any shard is sealed, when units
are reset and at the end: a crash loses at most the last few seconds of records, whose units
are simply run again, with the same bytes. A torn last line (a crash mid-append), a line
whose checksum fails and one that is not a record this module writes are ignored. When the
journal holds as many records as there are units, the state is written into a new snapshot
(temp + fsync + rename, keeping the replaced one as `.dist-svc-manifest.json.prev`) with a new,
empty journal: O(1) amortised per unit.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from dist_svc.errors import DistSvcError
from dist_svc.storage.checksum import is_digest
from dist_svc.storage.durable import temp_path
from dist_svc.storage.outdir import OutputDir, output_dir
from dist_svc.storage.types import MANIFEST_NAME
from dist_svc.version import __version__

if TYPE_CHECKING:
    from dist_svc.plan import Plan

LOCK_NAME = ".dist-svc.lock"
FORMAT = 4  # 4: units record a named checksum ("blake3:..."), no longer a bare sha256
SAVE_EVERY = 2.0  # seconds
MIN_COMPACT = 1000  # journal records before a new snapshot, at least


class OtherFormat(DistSvcError):
    """A manifest written by a dist-svc of another manifest format."""


class Manifest:
    def __init__(self, out: "OutputDir", data: dict[str, Any]):
        self.out = out  # where the snapshot and the journal are
        self.path = out.where(MANIFEST_NAME)  # the snapshot, for messages
        self.data = data
        self.damage: str | None = None  # why the snapshot itself was unusable (its previous copy is in use)
        self._journaled = self._replay()  # records in the journal of this generation
        # name -> checksum of every unit recorded as done: what layouts check stored bytes against.
        self.recorded: dict[str, str] = {n: u["checksum"] for n, u in data["units"].items() if u["done"]}
        self._pending: list[bytes] = []  # journal lines not yet written
        self._saved_at = time.monotonic()
        # Called before every save: whatever must be durable before the manifest says so.
        self.before_save: Callable[[], None] = lambda: None

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def load(cls, out_dir: "Path | str | OutputDir",
             log: Callable[[str], None] = lambda line: None) -> "Manifest":
        """The manifest in `out_dir`. If it is damaged (edited by hand, or its disk lost bits), its
        previous copy (kept at every save) is used: what was recorded since is run again."""
        out = output_dir(out_dir)
        snapshot, previous = out.read(MANIFEST_NAME), out.read(PREV_NAME)
        if snapshot is None and previous is None:
            raise DistSvcError(f"{out}: no dist-svc merge here ({MANIFEST_NAME} is missing).")
        try:
            return cls(out, _read(snapshot, out.where(MANIFEST_NAME)))
        except OtherFormat:
            raise  # not damage: another version's manifest, whose copy is of that version too
        except DistSvcError as damage:
            try:
                manifest = cls(out, _read(previous, out.where(PREV_NAME)))
            except DistSvcError:
                raise DistSvcError(f"{damage} Its previous copy is unusable too, so what this directory holds "
                                   f"cannot be trusted: delete {out} to start over.") from None
            manifest.damage = str(damage)
            log(f"warning: {damage} Using its previous copy; tensors recorded since then are merged again.")
            return manifest

    @classmethod
    def check(cls, out_dir: "Path | str | OutputDir", plan: "Plan",
              log: Callable[[str], None] = lambda line: None) -> "Manifest | None":
        """Read-only: this plan's manifest in `out_dir` if it is the same merge, None if the
        directory is new or empty; refused (nothing touched) if it holds anything else."""
        out = output_dir(out_dir)
        names = out.names()
        if MANIFEST_NAME in names or PREV_NAME in names:
            manifest = cls.load(out, log)
            if manifest.data["fingerprint"] != plan.fingerprint:
                raise DistSvcError(
                    f"{out} holds a different merge ({manifest.explain_mismatch(plan)}). Nothing was changed. "
                    f"Use a new output directory, or delete {out} to start this merge over.")
            return manifest
        if out.exists() and not out.is_dir():
            raise DistSvcError(f"{out} exists and is not a directory. Choose another output directory.")
        ours = {LOCK_NAME, temp_path(Path(MANIFEST_NAME)).name}  # a first save killed midway
        others = [n for n in names if n not in ours]
        if others:
            raise DistSvcError(
                f"{out} is not empty and holds no dist-svc merge (found {', '.join(sorted(others)[:3])}"
                f"{', ...' if len(others) > 3 else ''}). Nothing was changed. Choose a new or empty output directory.")
        return None

    @classmethod
    def create(cls, out_dir: "Path | str | OutputDir", plan: "Plan") -> "Manifest":
        manifest = cls(output_dir(out_dir), _initial(plan))
        manifest.compact()
        return manifest

    def explain_mismatch(self, plan: "Plan") -> str:
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
        """Marked complete and every unit recorded: a journal record that resets a unit of a
        finished merge makes it unfinished, whatever the snapshot says."""
        return self.data["complete"] and len(self.recorded) == len(self.units)

    @property
    def failed(self) -> str | None:
        """Why the last run stopped with an error (its message), None if it did not."""
        return self.data.get("failed")

    @property
    def output(self) -> tuple[str, dict]:
        """The output's format and layout options, as the plan chose them."""
        spec = dict(self.data["settings"]["config"]["output"])
        return spec.pop("format"), spec

    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of every output tensor, in plan order (Plan.entries)."""
        return [(name, u["dtype"], tuple(u["shape"])) for name, u in self.units.items()]

    def summary(self) -> str:
        """As `Plan.summary` says it."""
        units = self.units.values()
        total = sum(u["nbytes"] for u in units)
        settings = [m.get("copied") is True if isinstance(m, dict) else False for m in self.data["merged_with"]]
        copied = sum(_is(u.get("merged_with"), int) and 0 <= u["merged_with"] < len(settings)
                     and settings[u["merged_with"]] for u in units)
        return (f"{len(self.units)} tensors ({sum(u['calibrate'] for u in units)} calibrated"
                f"{f', {copied} non-float copied' if copied else ''}), {total / 2**30:.2f} GiB")

    def merged_with(self, name: str) -> dict[str, Any]:
        """The parameters unit `name` is merged with (the method's and each model's)."""
        return self.data["merged_with"][self.units[name]["merged_with"]]

    @property
    def side_files(self) -> dict[str, str]:
        """Side file -> sha256 of the bytes the output gets."""
        return self.data["side_files"]

    # -- changes (the driver only) -------------------------------------------------------------

    def record(self, name: str, checksum: str, info: dict[str, Any]) -> None:
        """Mark a unit done; on disk within SAVE_EVERY seconds (see the module's docstring)."""
        self.units[name].update(done=True, checksum=checksum, **info)
        self.recorded[name] = checksum
        self._append({"unit": name, "checksum": checksum, **info})
        if time.monotonic() - self._saved_at >= SAVE_EVERY:
            self.save()

    def reset(self, names: Iterable[str]) -> None:
        """Units whose bytes are gone or wrong: not done, on disk at once."""
        names = list(names)
        for name in names:
            self.units[name].update(done=False, checksum=None)
            self.recorded.pop(name, None)
        if names:
            self._append({"reset": names})
            self.save()

    @property
    def stamps(self) -> dict[str, str]:
        """The output's files as they were when the merge completed (OutputLayout.stamps)."""
        return self.data.get("stamps") or {}

    def set_complete(self, complete: bool, stamps: dict[str, str] | None = None) -> None:
        """Complete is written into a fresh snapshot, with the output's `stamps` as it is then:
        a finished merge is one file again."""
        if self.data["complete"] != complete:
            self.data["complete"] = complete
            if complete:
                self.data["stamps"] = stamps or {}
                self.compact()
            else:
                self._append({"complete": False})
                self.save()

    def set_failed(self, message: str | None) -> None:
        """A run stopped with this error (None: a run is under way again); on disk at once."""
        if self.failed != message:
            self.data["failed"] = message
            self._append({"failed": message})
            self.save()

    def flush(self) -> None:
        if self._pending:
            self.save()

    def save(self) -> None:
        """Make every change so far durable: first what `before_save` covers (the units' bytes),
        then the journal lines; a new snapshot once the journal is as long as the plan."""
        self.before_save()
        if self._pending:
            self.out.journal_append(self.journal_name(), b"".join(self._pending))
            self._journaled += len(self._pending)
            self._pending.clear()
        if self._journaled >= max(MIN_COMPACT, len(self.units)):
            self.compact()
        self._saved_at = time.monotonic()

    def compact(self) -> None:
        """Everything into a new snapshot of the next generation, with an empty journal; the
        journal it replaces is removed once the snapshot is durable."""
        self.before_save()
        old = self.journal_name()
        self.data["generation"] = self.data.get("generation", 0) + 1
        self.out.journal_close(old)
        self.out.replace(MANIFEST_NAME, json.dumps(self.data, separators=(",", ":")).encode(),
                         keep=PREV_NAME if self.damage is None else None)
        self.out.journal_remove(old)
        self.damage = None
        self._pending.clear()
        self._journaled = 0
        self._saved_at = time.monotonic()

    def remove_stale_journals(self) -> None:
        """Journals of older generations (a compaction killed before removing its old journal)."""
        current = self.journal_name()
        for name in self.out.journals(f".{MANIFEST_NAME.removesuffix('.json')}.*.journal"):
            if name != current:
                self.out.journal_remove(name)

    def close(self) -> None:
        self.out.journal_close()

    # -- the journal -------------------------------------------------------------------------------

    def journal_name(self) -> str:
        return f".{MANIFEST_NAME.removesuffix('.json')}.{self.data.get('generation', 0)}.journal"

    def _append(self, record: dict[str, Any]) -> None:
        body = json.dumps(record, separators=(",", ":")).encode()
        self._pending.append(b"%08x %s\n" % (zlib.crc32(body), body))

    def _replay(self) -> int:
        """Apply this generation's journal to the snapshot's state; returns the records applied."""
        raw = self.out.journal_read(self.journal_name())
        applied = 0
        for line in raw.split(b"\n")[:-1]:  # the last piece is a torn line, or empty
            crc, _, body = line.partition(b" ")
            try:
                if int(crc, 16) != zlib.crc32(body):
                    continue
                self._apply(json.loads(body))
            except (ValueError, RecursionError):
                continue  # a damaged line: its effect is lost (at worst a unit is run again)
            applied += 1
        return applied

    def _apply(self, record: Any) -> None:
        """One journal record; ValueError for anything that is not a record this class writes
        (checked as strictly as the snapshot: a valid CRC says the line is as written, not that
        what was written is a record)."""
        keys = set(record) if isinstance(record, dict) else set()
        if keys == set(_UNIT_RECORD):
            name = record["unit"]
            if not (all(check(record[key]) for key, check in _UNIT_RECORD.items()) and name in self.units):
                raise ValueError("not a unit record")
            self.units[name].update(done=True, **{k: v for k, v in record.items() if k != "unit"})
        elif keys == {"reset"}:
            names = record["reset"]
            if not isinstance(names, list) or not all(isinstance(n, str) and n in self.units for n in names):
                raise ValueError("not a reset record")
            for name in names:
                self.units[name].update(done=False, checksum=None)
        elif keys == {"complete"} and isinstance(record["complete"], bool):
            self.data["complete"] = record["complete"]
        elif keys == {"failed"} and (record["failed"] is None or isinstance(record["failed"], str)):
            self.data["failed"] = record["failed"]
        else:
            raise ValueError("not a record")

    def progress(self) -> dict[str, int]:
        units = self.units.values()
        return {
            "units_done": len(self.recorded),
            "units_total": len(self.units),
            "bytes_done": sum(u["nbytes"] for u in units if u["done"]),
            "bytes_total": sum(u["nbytes"] for u in units),
        }


PREV_NAME = f".{MANIFEST_NAME}.prev"  # the manifest's previous copy




_UNIT_KEYS = {"shape": list, "dtype": str, "nbytes": int, "done": bool}
# A journal record of a finished unit (`Manifest.record`): each key and what its value must be.
_UNIT_RECORD: dict[str, Callable[[Any], bool]] = {
    "unit": lambda v: isinstance(v, str),
    "checksum": is_digest,
    "seconds": lambda v: _is(v, float) or _is(v, int),
    "calibration": lambda v: v is None or isinstance(v, dict),
}


def _is(value: Any, kind: type) -> bool:
    """isinstance, except that a bool is not an int here (JSON true is not a byte count)."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _read(raw: bytes | None, path: str) -> dict[str, Any]:
    """A manifest's data, checked for everything the driver, status and verify rely on."""
    def damaged(problem: str) -> DistSvcError:
        return DistSvcError(f"{path}: the manifest is damaged ({problem}).")

    if raw is None:
        raise damaged("missing")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise damaged(f"unreadable: {str(e)[:100]}") from None
    if not isinstance(data, dict):
        raise damaged("not a JSON object")
    if isinstance(data.get("format"), int) and data["format"] != FORMAT:
        raise OtherFormat(f"{path}: written by a dist-svc whose manifests are format {data['format']}; this one "
                          f"({__version__}) reads format {FORMAT}. Nothing was changed. Finish an unfinished merge "
                          f"with the dist-svc that started it; a finished one's tensors are intact (it can be read "
                          f"as an input, or copied by `dist-svc convert`).")
    if data.get("format") != FORMAT:
        raise damaged(f"'format' is {str(data.get('format'))[:20]}")
    for key, kind in (("fingerprint", str), ("settings", dict), ("inputs", dict), ("side_files", dict),
                      ("complete", bool), ("units", dict), ("generation", int), ("merged_with", list)):
        if not _is(data.get(key), kind):
            raise damaged(f"'{key}' is missing or not a {kind.__name__}")
    if not (data.get("failed") is None or isinstance(data["failed"], str)):
        raise damaged("'failed' is not a message")
    stamps = data.get("stamps", {})
    if not isinstance(stamps, dict) or not all(isinstance(v, str) for v in stamps.values()):
        raise damaged("'stamps' is not a mapping of file to stamp")
    output = data["settings"].get("config", {}).get("output") if isinstance(data["settings"].get("config"), dict) else None
    if not isinstance(output, dict) or not isinstance(output.get("format"), str):
        raise damaged("'settings.config.output' is missing")
    for name, unit in data["units"].items():
        if not isinstance(unit, dict) or not all(_is(unit.get(k), t) for k, t in _UNIT_KEYS.items()):
            raise damaged(f"unit '{name[:80]}' lacks one of {', '.join(_UNIT_KEYS)}")
        if unit["done"] and not is_digest(unit.get("checksum")):
            raise damaged(f"unit '{name[:80]}' is done but has no checksum")
    return data


def _initial(plan: "Plan") -> dict[str, Any]:
    # What each unit is merged with, as a table of the distinct settings (most merges have one,
    # gradients one per layer) and an index per unit: a 47k-tensor MoE's manifest stays small.
    settings: dict[str, int] = {}
    units = {}
    for u in plan.units:
        key = json.dumps(u.merged_with(), sort_keys=True)
        index = settings.setdefault(key, len(settings))
        units[u.name] = {"shape": list(u.shape), "dtype": u.out_dtype, "calibrate": u.calibrate, "nbytes": u.nbytes,
                         "merged_with": index, "done": False, "checksum": None}
    return {
        "format": FORMAT,
        "generation": 0,
        "version": __version__,
        "fingerprint": plan.fingerprint,
        "settings": plan.settings,
        "inputs": plan.inputs,
        "side_files": {name: hashlib.sha256(data).hexdigest() for name, data in plan.side_files.items()},
        "merged_with": [json.loads(key) for key in settings],
        "complete": False,
        "units": units,
    }


def _diff(old: Any, new: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if old == new else [(prefix.removeprefix("config."), old, new)]
