"""Batch merging: many merges of the same inputs (`dist-svc sweep`, `dist_svc.sweep`).

A sweep is one config and its axes (`--set KEY=V1,V2,...`, KEY a dotted path into the config):
every combination of the values is one variant, a complete merge in its own directory under
OUT_DIR (`lambda=0.2,alpha=0.5`), exactly what `dist-svc merge` writes for the config with those
values set. OUT_DIR/sweep.json (and sweep.csv) lists the variants, their settings, where they are
and, with `--eval CMD`, their scores and the best one.

Bad input is found before anything is written, all of it at once: an unknown key (the settable
ones are listed), a value that does not parse, a key given twice, an empty list, a value given
twice on one axis, and each combination the config's own validation refuses (named).

The variants are merged together (dist_svc.driver.merge_many): each unit's inputs are read
once for every variant, variants that differ only in the method's final scale (lambda) compute
the method once, and calibrated ones share one Gram pass and one eigh per matrix for every
lambda, alpha and target (dist_svc.calibration.GramCalibration.solve). Each variant's bytes are
those of `dist-svc merge` of its config: a merge runs the same code, as a batch of one.

Rerunning the same command resumes: each variant resumes as a merge does, a finished one is
skipped, a score once recorded is kept (the variant's merge unchanged); adding a value to an
axis merges only the new variants.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import math
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

from dist_svc.errors import DistSvcError

RECORD = "sweep.json"
TABLE = "sweep.csv"
PLOT = "sweep.png"
EVAL_TAIL_LINES = 5  # of a failing evaluation's stderr, in its message

# Options of `calibrate:` a sweep may set (calibrate.skip is a list: not an axis).
CALIBRATION_KEYS = ("enabled", "alpha", "side", "target")
TOP_KEYS = ("merge_method", "dtype", "out_dtype", "base_model")


@dataclass(frozen=True)
class Axis:
    key: str  # a dotted path into the config: "parameters.lambda", "models.1.parameters.weight"
    values: tuple[Any, ...]  # as YAML reads them: numbers as numbers
    texts: tuple[str, ...]  # as given, for directory names


@dataclass
class Variant:
    settings: dict[str, Any]  # key -> value, in the axes' order
    path: str  # the directory under OUT_DIR
    document: dict  # the config's fields with the values set
    config: Any = None  # its MergeConfig, once validated
    score: float | None = None
    error: str | None = None  # why it has no result (its merge or evaluation failed)


def parse_axes(sets: Sequence[str]) -> tuple[list[Axis], list[str]]:
    """`KEY=V1,V2,...` items as axes, and what is wrong with them (one line each)."""
    axes: list[Axis] = []
    problems: list[str] = []
    seen: set[str] = set()
    for item in sets:
        key, eq, rest = item.partition("=")
        key = key.strip()
        if not eq or not key:
            problems.append(f"--set {item!r}: expected KEY=V1,V2,... such as parameters.lambda=0.5,1.0.")
            continue
        if key in seen:
            problems.append(f"--set {key}: given twice; list every value in one --set {key}=V1,V2,...")
            continue
        seen.add(key)
        texts = [t.strip() for t in rest.split(",")] if rest.strip() else []
        if not texts or any(not t for t in texts):
            problems.append(f"--set {key}: {'no values' if not texts else 'an empty value'} "
                            f"(got {rest!r}); list them as {key}=V1,V2,...")
            continue
        values, bad = [], []
        for text in texts:
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                value = bad.append(text)
            if isinstance(value, (dict, list)) or value is None:
                bad.append(text)
            values.append(value)
        if bad:
            problems.append(f"--set {key}: {', '.join(map(repr, bad))} is not a value (a number, true/false "
                            f"or a word).")
            continue
        repeated = sorted({t for v, t in zip(values, texts) if sum(_same(v, w) for w in values) > 1})
        if repeated:
            problems.append(f"--set {key}: {', '.join(repeated)} given twice.")
            continue
        axes.append(Axis(key, tuple(values), tuple(texts)))
    return axes, problems


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                            and not isinstance(a, bool) and not isinstance(b, bool) and a == b)


def settable_keys(document: Mapping[str, Any], axes: Sequence[Axis] = ()) -> list[str]:
    """The keys a sweep may set in this config: its top-level choices, every parameter of its
    method(s) (shared ones under `parameters.`, per-model ones under `models.N.parameters.`),
    the calibration's options, and every value the config already holds."""
    from dist_svc.methods import METHODS

    methods = {document.get("merge_method")}
    for axis in axes:
        if axis.key == "merge_method":
            methods |= set(axis.values)
    declared = [METHODS[m] for m in methods if isinstance(m, str) and m in METHODS]
    keys = set(TOP_KEYS) | {f"calibrate.{k}" for k in CALIBRATION_KEYS}
    models = document.get("models")
    for method in declared:
        keys |= {f"parameters.{p.name}" for p in method.params}
        if isinstance(models, list):
            keys |= {f"models.{i}.parameters.{p.name}" for i in range(len(models)) for p in method.model_params}
    keys |= set(_leaves(document))
    return sorted(keys)


def _leaves(value: Any, prefix: str = "") -> Iterable[str]:
    """Dotted paths of the scalars in a config document."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{prefix}{i}.")
    elif prefix:
        yield prefix[:-1]


def with_setting(document: dict, key: str, value: Any) -> dict:
    """A copy of the config document with `key` (a dotted path) set to `value`; mappings on the
    way are created (`parameters:`, a model's `parameters:`), `calibrate: true` becomes
    `calibrate: {enabled: true, ...}`."""
    doc = copy.deepcopy(document)
    parts = key.split(".")
    node: Any = doc
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[int(part)]
            continue
        child = node.get(part)
        if part == "calibrate" and i == 0 and not isinstance(child, dict):
            child = {} if child is None else {"enabled": child}
            node[part] = child
        elif child is None:
            child = node[part] = {}
        node = child
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value
    return doc


def _reachable(document: dict, key: str) -> bool:
    """Whether `with_setting` can set `key`: list indices in range, no scalar on the way."""
    node: Any = document
    for part in key.split(".")[:-1]:
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return False
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.get(part, {})
            if node is None or (part == "calibrate" and not isinstance(node, (dict, list))):
                node = {}
        else:
            return False
    return isinstance(node, (dict, list))


def variant_names(axes: Sequence[Axis]) -> list[str]:
    """The shortest unique trailing part of each key: `lambda`, `alpha`; `0.parameters.weight`
    and `1.parameters.weight` where two keys end alike."""
    for depth in range(1, max((len(a.key.split(".")) for a in axes), default=1) + 1):
        names = [".".join(a.key.split(".")[-depth:]) for a in axes]
        if len(set(names)) == len(names):
            return names
    return [a.key for a in axes]


def plan_sweep(document: dict, axes: Sequence[Axis], source: str = "the config",
               calibrate: bool | None = None) -> list[Variant]:
    """Every combination of the axes' values as a validated variant; every problem (an unknown
    key, a combination the config refuses) in one DistSvcError."""
    from dist_svc.config import parse_config

    if not axes:
        raise DistSvcError("sweep: no --set KEY=V1,V2,... given; a sweep needs at least one axis "
                           "(a single merge is `dist-svc merge`).")
    keys = settable_keys(document, axes)
    problems = []
    for axis in axes:
        if axis.key not in keys or not _reachable(document, axis.key):
            problems.append(f"--set {axis.key}: not a key of this config. Settable keys: {', '.join(keys)}.")
    if problems:
        raise DistSvcError("\n".join(problems))
    names = variant_names(axes)
    variants = []
    for values in itertools.product(*(range(len(a.values)) for a in axes)):
        doc = document
        for axis, i in zip(axes, values):
            doc = with_setting(doc, axis.key, axis.values[i])
        path = ",".join(f"{n}={_safe(a.texts[i])}" for n, a, i in zip(names, axes, values))
        settings = {a.key: a.values[i] for a, i in zip(axes, values)}
        variant = Variant(settings, path, doc)
        try:
            variant.config = parse_config(doc, source=f"{source} with {path}", calibrate=calibrate)
        except DistSvcError as e:
            problems.append(f"variant {path}: the config refuses it: {e}")
        variants.append(variant)
    if problems:
        raise DistSvcError("\n".join(problems))
    return variants


def _safe(text: str) -> str:
    """A value as part of a directory name (and an object key): no separators."""
    return re.sub(r"[/\\\s]", "_", text)


# -- evaluation ------------------------------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)\b", re.IGNORECASE)


def evaluate(command: str, model: str, cwd: str | None = None) -> float:
    """Run the evaluation command with `{model}` replaced by the variant's directory (quoted for
    the shell); its score is the last number it prints on stdout."""
    line = command.replace("{model}", shlex.quote(model))
    try:
        done = subprocess.run(line, shell=True, capture_output=True, text=True, cwd=cwd)
    except OSError as e:
        raise DistSvcError(f"--eval {command!r}: cannot run it: {e.strerror}.") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-EVAL_TAIL_LINES:])
        raise DistSvcError(f"--eval {line!r} exited with {done.returncode}" + (f"; it said:\n{tail}" if tail else "."))
    numbers = _NUMBER.findall(done.stdout)
    if not numbers:
        raise DistSvcError(f"--eval {line!r} printed no number on stdout; the score is the last number it prints.")
    return float(numbers[-1])


def best(variants: Sequence[Variant], minimize: bool) -> Variant | None:
    scored = [v for v in variants if v.score is not None and math.isfinite(v.score)]
    if not scored:
        return None
    pick = min if minimize else max
    return pick(scored, key=lambda v: v.score)


# -- the record ------------------------------------------------------------------------------------

def record(variants: Sequence[Variant], axes: Sequence[Axis], minimize: bool) -> dict:
    top = best(variants, minimize)
    out: dict[str, Any] = {"keys": [a.key for a in axes], "variants": []}
    for v in variants:
        entry: dict[str, Any] = {"settings": v.settings, "path": v.path}
        if v.score is not None:
            entry["score"] = v.score
        if v.error is not None:
            entry["error"] = v.error
        out["variants"].append(entry)
    if top is not None:
        out["best"] = top.path
        out["minimize"] = minimize
    return out


def table(variants: Sequence[Variant], axes: Sequence[Axis]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([a.key for a in axes] + ["path", "score"])
    for v in variants:
        writer.writerow([v.settings[a.key] for a in axes] + [v.path, "" if v.score is None else repr(v.score)])
    return buf.getvalue()


def plot(variants: Sequence[Variant], axes: Sequence[Axis]) -> bytes | None:
    """With two axes and scores: the score against the first key, one line per value of the
    second (PNG bytes); None otherwise or without matplotlib."""
    if len(axes) != 2 or not any(v.score is not None for v in variants):
        return None
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    first, second = axes
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in first.values)
    for value, text in zip(second.values, second.texts):
        points = [(v.settings[first.key], v.score) for v in variants
                  if _same(v.settings[second.key], value) and v.score is not None]
        if numeric:
            points.sort()
        xs = [p[0] if numeric else str(p[0]) for p in points]
        ax.plot(xs, [p[1] for p in points], marker="o", label=f"{second.key}={text}")
    ax.set_xlabel(first.key)
    ax.set_ylabel("score")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def earlier_scores(data: bytes | None) -> dict[tuple[str, str], float]:
    """Scores an earlier run recorded, by (path, settings as JSON)."""
    if not data:
        return {}
    try:
        doc = json.loads(data)
        return {(v["path"], json.dumps(v["settings"], sort_keys=True)): float(v["score"])
                for v in doc.get("variants", []) if isinstance(v, dict) and "score" in v}
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}


@dataclass
class SweepReport:
    out_dir: str
    variants: list[Variant] = field(default_factory=list)
    best: str | None = None
    seconds: float = 0.0

    @property
    def failed(self) -> list[Variant]:
        """Variants without a result: their merge or their evaluation failed (`error` says why)."""
        return [v for v in self.variants if v.error is not None]

    def __repr__(self) -> str:
        done = len(self.variants) - len(self.failed)
        best = f", best={self.best!r}" if self.best else ""
        return f"SweepReport({done}/{len(self.variants)} variants, {self.seconds:.1f} s, out_dir={self.out_dir!r}{best})"


def sweep(config: Mapping[str, Any] | str | Path, out_dir: str | Path, sets: Sequence[str], *,
          eval_command: str | None = None, minimize: bool = False, calibrate: bool | None = None,
          log: Callable[[str], None] = lambda line: None, **merge_options) -> SweepReport:
    """Merge every variant of `config` the `sets` (KEY=V1,V2,... each) make into its own
    directory under `out_dir`; `merge_options` as `dist_svc.merge` takes them. A variant whose
    merge or evaluation fails does not stop the others: the report's `failed` lists them."""
    import time

    from dist_svc.config import read_documents
    from dist_svc.driver import merge_many, out_path
    from dist_svc.storage.outdir import output_dir

    start = time.perf_counter()
    if isinstance(config, (str, Path)):
        documents = read_documents(config)
        if len(documents) != 1:
            raise DistSvcError(f"{config} holds {len(documents)} merges (stages); a sweep takes a config of one merge.")
        document, source = documents[0], str(config)
    elif isinstance(config, Mapping):
        document, source = dict(config), "the config (a dict)"
    else:
        raise DistSvcError(f"sweep: expected a path to a YAML config or a dict of its fields; got a {type(config).__name__}.")
    if not isinstance(document, dict):
        raise DistSvcError(f"{source}: expected a YAML mapping with 'merge_method', 'base_model' and 'models'.")
    axes, problems = parse_axes(sets)
    if problems:
        raise DistSvcError("\n".join(problems))
    variants = plan_sweep(document, axes, source, calibrate)
    out_dir = out_path(out_dir)
    root = output_dir(out_dir)
    scores = earlier_scores(root.read(RECORD)) if root.exists() else {}
    root.mkdir()
    base = str(out_dir).rstrip("/")
    log(f"sweep: {len(variants)} variants, merged together (each unit's inputs read once for all)")
    results = merge_many([(v.config, f"{base}/{v.path}") for v in variants], log=log, **merge_options)
    for variant, result in zip(variants, results):
        where = f"{base}/{variant.path}"
        if isinstance(result, DistSvcError):
            variant.error = str(result)
            log(f"variant {variant.path} failed: {result}")
            continue
        known = scores.get((variant.path, json.dumps(variant.settings, sort_keys=True)))
        if known is not None and result.already_complete:
            variant.score = known
        elif eval_command:
            try:
                variant.score = evaluate(eval_command, where)
                log(f"variant {variant.path}: score {variant.score:g}")
            except DistSvcError as e:
                variant.error = str(e)
                log(f"variant {variant.path}: {e}")
            _write_record(root, variants, axes, minimize)
    _write_record(root, variants, axes, minimize)
    top = best(variants, minimize)
    return SweepReport(str(out_dir), variants, top.path if top else None, time.perf_counter() - start)


def _write_record(root, variants: Sequence[Variant], axes: Sequence[Axis], minimize: bool) -> None:
    root.write(RECORD, (json.dumps(record(variants, axes, minimize), indent=2) + "\n").encode())
    root.write(TABLE, table(variants, axes).encode())
    png = plot(variants, axes)
    if png is not None:
        root.write(PLOT, png)
