"""The merge configuration: mergekit's YAML (and a few dist-svc fields), parsed once into typed
objects.

Everything downstream receives a validated `MergeConfig`. Field names are mergekit's, so a
mergekit config runs unchanged: `models:` or `slices:`, `merge_method`, `base_model`,
`parameters` (values, layer gradients and filters, per model or global), `dtype`, `out_dtype`,
`tokenizer_source` / `tokenizer`, `chat_template`; dist-svc adds `calibrate` and `output`. A
file may hold several YAML documents (mergekit-multimerge's stages, dist_svc.stages).

Every problem found is reported at once, in one `DistSvcError` that names the file and each
field and says what to write instead. What the YAML may cost is bounded before anything is
built from it: the file's size, its nesting, and how far aliases expand it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from dist_svc.errors import DistSvcError
from dist_svc.methods import METHODS, Method, Param
from dist_svc.methods.base import as_bool, show
from dist_svc.storage import source_of
from dist_svc.storage.durable import local_path
from dist_svc.storage.output import DEFAULT_FORMAT, FORMATS as OUTPUT_FORMATS, all_options

# Names containing these are embedding-like and skipped by calibration by default: the authors
# skip "embedding"; in LLM checkpoints that is embed_tokens / wte / wpe and the tied-shape lm_head.
DEFAULT_SKIP = ("*embed*", "*wte*", "*wpe*", "*lm_head*")

# What a config may cost before it is parsed: real configs are a few KB (a long evolved one with
# filters on every parameter, ~100 KB).
MAX_CONFIG_BYTES = 4 << 20
MAX_YAML_NODES = 200_000  # values after alias expansion
MAX_YAML_DEPTH = 64

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64", "double": "float64",
}
# Chat templates mergekit ships by name (dist_svc.vocab holds their text).
CHAT_TEMPLATE_NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")

_TOP_FIELDS = {
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
    "tokenizer", "chat_template", "name", "calibrate", "output",
}
_REFUSED_TOP = {
    "modules": "per-module configurations are not supported; write the merge with `models:` or `slices:`",
}


@dataclass(frozen=True)
class SourceSpec:
    """One input of an output slice (mergekit's InputSliceDefinition; a `models:` entry is a
    source covering every layer)."""

    model: int  # index into MergeConfig.checkpoints
    layer_range: tuple[int, int] | None  # None: every layer of the model
    parameters: Mapping[str, Any]  # its own settings, validated, as written
    field: str  # where it is written, for messages ("models[1]", "slices[0].sources[2]")


@dataclass(frozen=True)
class SliceSpec:
    sources: tuple[SourceSpec, ...]
    parameters: Mapping[str, Any]
    field: str


@dataclass(frozen=True)
class TokenSource:
    """Where a token's embedding row comes from (mergekit's TokenEmbeddingConfig.source)."""

    kind: str  # "default" (mergekit's rule), "model" (the token's row in that model), "model_token", "zero"
    model: str | None = None  # a checkpoint's path
    token: str | None = None  # model_token: the donor token ...
    token_id: int | None = None  # ... or its id


@dataclass(frozen=True)
class TokenizerSpec:
    """mergekit's `tokenizer:` (or `tokenizer_source:`): the output vocabulary and each token's rows."""

    source: str  # "base", "union", or a model's path
    tokens: tuple[tuple[str, TokenSource, bool], ...] = ()  # (token, source, force)
    pad_to_multiple_of: int | None = None


@dataclass(frozen=True)
class CalibrationSpec:
    """Singular Value Calibration options (see docs/calibration.md)."""

    enabled: bool = True
    alpha: float | None = None  # None: 1/K of each tensor (1 for methods that say so)
    side: str = "column"
    target: int | None = None  # index into the fine-tunes (0-based) to calibrate against one task
    skip: tuple[str, ...] = DEFAULT_SKIP

    def resolved_alpha(self, k: int, alpha_is_one: bool = False) -> float:
        if self.alpha is not None:
            return self.alpha
        return 1.0 if alpha_is_one else 1.0 / k


@dataclass(frozen=True)
class OutputSpec:
    """How the merged model is stored: an output format (dist_svc.storage.output: FORMATS) and
    the options written for it (`values`: by layout key, as read; e.g. shard_bytes, compression),
    which stay when the command line chooses another format."""

    format: str = DEFAULT_FORMAT
    values: Mapping[str, Any] = field(default_factory=dict)
    given: bool = field(default=False, compare=False)  # written in the config (else OUT_DIR's suffix may choose)

    def options(self) -> dict[str, Any]:
        """What the layout needs, and what decides its bytes (part of the fingerprint): every
        option of the format, written or its default."""
        return OUTPUT_FORMATS[self.format].layout_options(self.values)


@dataclass(frozen=True)
class MergeConfig:
    merge_method: str
    checkpoints: tuple[Path | str, ...]  # every model the merge reads (a URL, Hub ID or MODEL+ADAPTER stays a str)
    base: int | None  # index of base_model in `checkpoints` (0), or None
    slices: tuple[SliceSpec, ...]
    whole_models: bool = True  # written as `models:` (one slice of whole models)
    parameters: Mapping[str, Any] = field(default_factory=dict)  # global settings, validated
    dtype: str = "float32"
    out_dtype: str | None = None
    calibration: CalibrationSpec = CalibrationSpec()
    output: OutputSpec = OutputSpec()
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None
    copy_tokenizer: bool = True  # mergekit's --copy-tokenizer: the donor's tokenizer files go along
    allow_crimes: bool = False  # mergekit's --allow-crimes: inputs of different architectures
    notes: tuple[str, ...] = field(default=(), compare=False)  # what was accepted but has no effect
    source: str = "<config>"
    document: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)  # as written (the model card)

    @property
    def method(self) -> Method:
        return METHODS[self.merge_method]

    @property
    def base_model(self) -> Path | None:
        return None if self.base is None else self.checkpoints[self.base]

    @property
    def k(self) -> int:
        """The most fine-tunes (non-base inputs) one tensor merges."""
        return max(sum(s.model != self.base for s in sl.sources) for sl in self.slices)

    # -- what the command line may change ----------------------------------------------------------

    def with_calibration(self, enabled: bool | None) -> "MergeConfig":
        if enabled is None:
            return self
        if enabled and self.base is None:
            raise DistSvcError(_no_base_for_calibration(self.source, self.merge_method, "--calibrate"))
        cal = dataclasses.replace(self.calibration, enabled=enabled)
        return dataclasses.replace(self, calibration=cal)

    def with_output(self, fmt: str | None = None, **options: Any) -> "MergeConfig":
        """The command line's output format and options (by `output:` name, e.g. shard_size=
        bytes; None: as the config says)."""
        output = self.output
        if fmt is not None:
            output = dataclasses.replace(output, format=fmt)
        given = {all_options()[name].key: value for name, value in options.items() if value is not None}
        if given:
            output = dataclasses.replace(output, values={**output.values, **given})
        return dataclasses.replace(self, output=output)

    def with_options(self, copy_tokenizer: bool | None = None, allow_crimes: bool | None = None,
                     random_seed: int | None = None) -> "MergeConfig":
        """mergekit's merge options: --copy-tokenizer, --allow-crimes, --random-seed (the seed of
        a method that draws random numbers)."""
        config = self
        if copy_tokenizer is not None:
            config = dataclasses.replace(config, copy_tokenizer=copy_tokenizer)
        if allow_crimes is not None:
            config = dataclasses.replace(config, allow_crimes=allow_crimes)
        if random_seed is not None and self.method.param("seed") is not None:
            config = dataclasses.replace(config, parameters={**config.parameters, "seed": int(random_seed)})
        return config

    def fingerprint_dict(self) -> dict[str, Any]:
        """What determines the output bytes, in a stable JSON-able form (no source path): every
        parameter of every model as written, so that any change is a different merge."""
        cal = self.calibration
        return {
            "merge_method": self.merge_method,
            "base_model": None if self.base is None else str(self.checkpoints[self.base]),
            # Keyed by where each is written, so that a changed value is named in the refusal
            # of a rerun ('sources.models[1].parameters.gamma' was 0.01, now 0.05).
            "sources": {s.field: {"model": str(self.checkpoints[s.model]), "layer_range": s.layer_range,
                                  "parameters": _sorted(s.parameters)} for sl in self.slices for s in sl.sources},
            "slices": {sl.field: _sorted(sl.parameters) for sl in self.slices} if not self.whole_models else None,
            "parameters": _sorted(self.parameters),
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
            "calibrate": {
                "enabled": cal.enabled,
                "alpha": cal.alpha if cal.enabled else None,  # None: 1/K of each tensor
                "side": cal.side,
                "target": cal.target,
                "skip": list(cal.skip),
            },
            "tokenizer": None if self.tokenizer is None else dataclasses.asdict(self.tokenizer),
            "chat_template": self.chat_template,
            "copy_tokenizer": self.copy_tokenizer,
            "output": {"format": self.output.format, **self.output.options()},
        }


def _sorted(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return dict(sorted(mapping.items()))


# -- reading the file -------------------------------------------------------------------------------

def load_config(path: str | Path, calibrate: bool | None = None) -> MergeConfig:
    """Read a YAML config file of one merge; `calibrate` (the CLI flag) overrides the file's
    `calibrate:`. A file of several merges (stages) is read with dist_svc.stages."""
    documents = read_documents(path)
    if len(documents) != 1:
        raise DistSvcError(f"{path} holds {len(documents)} merges (YAML documents, mergekit-multimerge's stages); "
                           f"run it with `dist-svc merge {path} OUT_DIR`, which runs them in order.")
    return parse_config(documents[0], source=str(path), calibrate=calibrate)


def read_documents(path: str | Path) -> list[Any]:
    """The YAML documents of a config file, refused with one clear paragraph when the file is not
    UTF-8 YAML, repeats a key, or costs more than a config can (size, nesting, alias expansion)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise DistSvcError(f"cannot read config file {path}: {e.strerror}.") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise DistSvcError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; a merge config is a few KB. "
                           f"Is this the right file?")
    if b"\0" in raw:
        raise DistSvcError(f"{path}: a binary file (it contains NUL bytes), not a YAML config. Is this the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DistSvcError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); mergekit "
                           f"configs are UTF-8 YAML. Save the file as UTF-8.") from None
    try:
        loader = _Loader(text)
        loader.name = str(path)  # for PyYAML's own messages, and ours
        documents = []
        try:
            while loader.check_node():
                node = loader.get_node()
                _check_size(node, str(path))
                documents.append(loader.construct_document(node))
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise DistSvcError(f"{path} is not valid YAML: {show(str(e), 400)}") from None
    except RecursionError:
        raise DistSvcError(f"{path}: nested more than {MAX_YAML_DEPTH} levels deep; not a merge config.") from None
    documents = [d for d in documents if d is not None]
    if not documents:
        raise DistSvcError(f"{path}: empty. A merge config names 'merge_method', 'base_model' and 'models'.")
    return documents


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping (PyYAML keeps the last
    one silently; mergekit inherits that)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # PyYAML refuses it below, with its own message
            if key in seen:
                raise DistSvcError(f"{self.name}: key {show(key)} "
                                   f"is written twice in one mapping (lines {seen[key].start_mark.line + 1} and "
                                   f"{key_node.start_mark.line + 1}); YAML keeps only the last one. "
                                   f"Keep one of them.")
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _check_size(root: yaml.Node, where: str) -> None:
    """Refuse a document that expands (through aliases) to more than MAX_YAML_NODES values or
    nests deeper than MAX_YAML_DEPTH: linear in the YAML's own size, whatever it expands to."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if depth > MAX_YAML_DEPTH:
            raise DistSvcError(f"{where}: nested more than {MAX_YAML_DEPTH} levels deep; not a merge config.")
        if key in active:
            raise DistSvcError(f"{where}: an alias refers to the value that contains it (a recursive "
                               f"structure); a merge config cannot hold one.")
        active.add(key)
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        else:
            total = 1
        active.discard(key)
        if total > MAX_YAML_NODES:
            raise DistSvcError(f"{where}: expands to more than {MAX_YAML_NODES} values (through YAML aliases); "
                               f"a merge config has a few hundred. Write the values out, or check the anchors.")
        sizes[key] = total
        return total

    size(root, 0)


# -- parsing ----------------------------------------------------------------------------------------

class _Problems:
    """Every problem of one config, reported together."""

    def __init__(self, source: str):
        self.source = source
        self.items: list[str] = []

    def add(self, name: str, message: str) -> None:
        self.items.append(f"field '{name}': {message}" if name else message)

    def raise_any(self) -> None:
        if len(self.items) == 1:
            raise DistSvcError(f"{self.source}: {self.items[0]}")
        if self.items:
            lines = "\n".join(f"  - {item}" for item in self.items)
            raise DistSvcError(f"{self.source}: {len(self.items)} problems:\n{lines}")


def parse_config(raw: Any, source: str = "<config>", calibrate: bool | None = None) -> MergeConfig:
    problems = _Problems(source)
    if not isinstance(raw, dict):
        raise DistSvcError(f"{source}: expected a YAML mapping with 'merge_method', 'base_model' and 'models' "
                           f"(got {show(raw)}).")
    notes: list[str] = []
    for key in raw:
        if key in _REFUSED_TOP:
            problems.add(str(key), _REFUSED_TOP[key] + ".")
        elif key not in _TOP_FIELDS and _did_you_mean(key, _TOP_FIELDS):  # a typo of a field
            problems.add(_name(key), f"unknown field{_did_you_mean(key, _TOP_FIELDS)}. "
                                    f"Known fields: {', '.join(sorted(_TOP_FIELDS))}.")
        elif key not in _TOP_FIELDS:  # a GUI's or a model card's own field (model_name, ...)
            notes.append(f"{_name(key)} is not a merge field; it has no effect (mergekit ignores it too).")

    method_name = raw.get("merge_method")
    method = None
    if method_name is None:
        problems.add("merge_method", f"missing. Choose one of: {', '.join(sorted(METHODS))}.")
    elif not isinstance(method_name, str) or method_name not in METHODS:
        problems.add("merge_method", f"{show(method_name)} is not supported{_did_you_mean(method_name, METHODS)}. "
                                     f"Choose one of: {', '.join(sorted(METHODS))}.")
    else:
        method = METHODS[method_name]

    checkpoints: list[Path] = []
    index: dict[Path, int] = {}

    def checkpoint(text: Any, name: str) -> int | None:
        path = _model_path(text, name, problems)
        if path is None:
            return None
        if path not in index:
            index[path] = len(checkpoints)
            checkpoints.append(path)
        return index[path]

    base = None
    if raw.get("base_model") is not None:
        base = checkpoint(raw["base_model"], "base_model")

    params = _settings(raw.get("parameters"), "parameters", method, problems, notes, shared=True)

    has_models, has_slices = raw.get("models") is not None, raw.get("slices") is not None
    slices: list[SliceSpec] = []
    if has_models == has_slices:
        problems.add("models" if not has_models else "slices",
                     "write exactly one of `models:` (the models to merge) and `slices:` (layer ranges)."
                     if has_models else "missing. List the models to merge as `models: [{model: PATH}, ...]`.")
    elif has_models:
        slices = _models(raw["models"], base, checkpoint, method, problems, notes)
    else:
        slices = _slices(raw["slices"], base, checkpoint, method, problems, notes)

    if method is not None and slices:
        _check_contract(method, base, slices, checkpoints, problems)

    dtype = _dtype(raw.get("dtype") or "float32", "dtype", problems)
    out_dtype = None if raw.get("out_dtype") is None else _dtype(raw["out_dtype"], "out_dtype", problems)
    calibration = _calibration(raw.get("calibrate"), base is not None, method_name, problems, source)
    if calibrate is not None:
        if calibrate and base is None:
            problems.add("calibrate", _no_base_for_calibration(source, method_name, "--calibrate").split(": ", 1)[1])
        calibration = dataclasses.replace(calibration, enabled=calibrate)
    k = max((sum(s.model != base for s in sl.sources) for sl in slices), default=0)
    if calibration.target is not None and calibration.target >= k:
        problems.add("calibrate.target", f"must be a fine-tune's index from 0 to {k - 1} (got {calibration.target}).")
    tokenizer = _tokenizer(raw, problems)
    chat_template = _chat_template(raw.get("chat_template"), problems)
    output = _output(raw.get("output"), problems)
    problems.raise_any()
    return MergeConfig(
        merge_method=method_name, checkpoints=tuple(checkpoints), base=base, slices=tuple(slices),
        whole_models=has_models, parameters=params, dtype=dtype, out_dtype=out_dtype, calibration=calibration,
        output=output, tokenizer=tokenizer, chat_template=chat_template, notes=tuple(notes), source=source,
        document=raw,
    )


def _no_base_for_calibration(source: str, method: str | None, how: str) -> str:
    return (f"{source}: calibration ({how}) needs a base model: it rescales the merged delta (merged - base) "
            f"against the task vectors (fine-tune - base). Set `base_model:`, or turn calibration off "
            f"(`calibrate: false`, --no-calibrate) to run {method or 'this method'} without one.")


def _model_path(text: Any, name: str, problems: _Problems) -> Path | str | None:
    if isinstance(text, os.PathLike):  # a `Path` in a config passed as a dict (the Python API)
        text = os.fspath(text)
    if not isinstance(text, str) or not text.strip():
        problems.add(name, f"expected a model's path (got {show(text)}).")
        return None
    # Like mergekit, model paths are taken relative to the working directory; URLs, Hub IDs and
    # MODEL+ADAPTER stay strings (dist_svc.storage.source_of).
    try:
        return source_of(text)
    except DistSvcError as e:
        problems.add(name, str(e))
        return None


def _models(raw: Any, base: int | None, checkpoint, method: Method | None, problems: _Problems,
            notes: list[str]) -> list[SliceSpec]:
    """`models:` as one slice of whole models; the base is one of its sources (appended last
    when not listed, as mergekit does)."""
    if not isinstance(raw, list) or not raw:
        problems.add("models", "expected a list of models such as [{model: PATH, parameters: {weight: 1.0}}].")
        return []
    sources: list[SourceSpec] = []
    seen: dict[int, str] = {}
    for i, entry in enumerate(raw):
        name = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            problems.add(name, f"expected a mapping with 'model: PATH' (got {show(entry)}).")
            continue
        for key in entry:
            if key not in ("model", "parameters"):
                problems.add(f"{name}.{key}", "unknown field; a model entry has 'model' and 'parameters'.")
        model = checkpoint(entry["model"], f"{name}.model")
        own = _settings(entry.get("parameters"), f"{name}.parameters", method, problems, notes, shared=False,
                        is_base=model is not None and model == base)
        if model is None:
            continue
        if model in seen:
            problems.add(name, f"{seen[model]} and {name} are the same model ({show(str(entry['model']), 200)}); "
                               f"list each model once (a larger weight counts it more).")
            continue
        seen[model] = name
        sources.append(SourceSpec(model, None, own, name))
    if base is not None and base not in seen:
        sources.append(SourceSpec(base, None, {}, "base_model"))
    return [SliceSpec(tuple(sources), {}, "models")]


def _slices(raw: Any, base: int | None, checkpoint, method: Method | None, problems: _Problems,
            notes: list[str]) -> list[SliceSpec]:
    if not isinstance(raw, list) or not raw:
        problems.add("slices", "expected a list such as [{sources: [{model: PATH, layer_range: [0, 16]}]}].")
        return []
    out = []
    for i, entry in enumerate(raw):
        name = f"slices[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list) or not entry["sources"]:
            problems.add(name, "expected a mapping with 'sources: [{model: PATH, layer_range: [START, END]}, ...]'.")
            continue
        for key in entry:
            if key == "base_model":
                problems.add(f"{name}.base_model", "a base model per slice is not supported; set the top-level "
                                                   "`base_model:`.")
            elif key == "residual_weight":
                notes.append(f"{name}.residual_weight has no effect (mergekit 0.1.5 reads it and does not use it).")
            elif key not in ("sources", "parameters"):
                problems.add(f"{name}.{key}", "unknown field; a slice has 'sources' and 'parameters'.")
        slice_params = _settings(entry.get("parameters"), f"{name}.parameters", method, problems, notes, shared=True)
        sources, seen = [], {}
        for j, src in enumerate(entry["sources"]):
            sname = f"{name}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src:
                problems.add(sname, f"expected a mapping with 'model' and 'layer_range' (got {show(src)}).")
                continue
            for key in src:
                if key not in ("model", "layer_range", "parameters"):
                    problems.add(f"{sname}.{key}", "unknown field; a source has 'model', 'layer_range' and 'parameters'.")
            model = checkpoint(src["model"], f"{sname}.model")
            layer_range = _layer_range(src.get("layer_range"), f"{sname}.layer_range", problems)
            own = _settings(src.get("parameters"), f"{sname}.parameters", method, problems, notes, shared=False,
                            is_base=model is not None and model == base)
            if model is None or layer_range is None:
                continue
            if model in seen:
                problems.add(sname, f"{seen[model]} and {sname} read the same model; a slice takes each model once.")
                continue
            seen[model] = sname
            sources.append(SourceSpec(model, layer_range, own, sname))
        if sources:
            lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
            if len(lengths) > 1:
                problems.add(f"{name}.sources", f"layer ranges of different lengths ({sorted(lengths)}); the sources "
                                                f"of a slice are merged layer by layer, so they need as many layers each.")
            out.append(SliceSpec(tuple(sources), slice_params, name))
    return out


def _layer_range(raw: Any, name: str, problems: _Problems) -> tuple[int, int] | None:
    if (not isinstance(raw, list) or len(raw) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in raw)
            or not 0 <= raw[0] < raw[1]):
        problems.add(name, f"expected [START, END] with 0 <= START < END, the layers START..END-1 (got {show(raw)}).")
        return None
    return (raw[0], raw[1])


def _check_contract(method: Method, base: int | None, slices: list[SliceSpec], checkpoints: list[Path],
                    problems: _Problems) -> None:
    """mergekit's InputContract, checked for every slice before anything is read."""
    if method.base == "required" and base is None:
        problems.add("base_model", f"missing; {method.name} merges task vectors (model - base) and needs it.")
        return
    for sl in slices:
        inputs = list(sl.sources)
        has_base = base is not None and any(s.model == base for s in inputs)
        if method.base == "ignored":
            fine_tunes = len(inputs)
        else:
            fine_tunes = len(inputs) - has_base
            if method.base == "required" and not has_base:
                problems.add(f"{sl.field}.sources", f"does not list base_model ({checkpoints[base]}) among its sources; "
                                                    f"{method.name} needs the base in every slice.")
                continue
        where = "models" if sl.field == "models" else f"{sl.field}.sources"
        if len(inputs) < method.min_inputs or (method.max_inputs is not None and len(inputs) > method.max_inputs):
            problems.add(where, f"{method.name} merges {_count(method.min_inputs, method.max_inputs)} model(s) "
                                f"(the base included{' when given' if method.base == 'ignored' else ''}); "
                                f"this lists {len(inputs)}.")
        elif fine_tunes < method.min_fine_tunes or (method.max_fine_tunes is not None
                                                   and fine_tunes > method.max_fine_tunes):
            problems.add(where, f"{method.name} merges {_count(method.min_fine_tunes, method.max_fine_tunes)} "
                                f"model(s) besides the base; this lists {fine_tunes}.")


def _count(low: int, high: int | None) -> str:
    if high is None:
        return f"at least {low}"
    return f"exactly {low}" if low == high else f"{low} to {high}"


# -- parameters ------------------------------------------------------------------------------------

def _all_param_names() -> set[str]:
    return {p.name for m in METHODS.values() for p in m.params}


def _settings(raw: Any, name: str, method: Method | None, problems: _Problems, notes: list[str], *,
              shared: bool, is_base: bool = False) -> dict[str, Any]:
    """A `parameters:` mapping, every setting checked against the method's declaration. Under
    `parameters:` (shared) any parameter may be given, a per-model one being every model's
    default; under a model, only per-model ones. A parameter another method declares is left out
    with a note, as mergekit ignores it; any other name is refused as a typo."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.add(name, f"expected a mapping such as {{weight: 1.0}} (got {show(raw)}).")
        return {}
    out = {}
    for pname, value in raw.items():
        if method is None:
            continue
        pname_s = str(pname)
        param = method.param(pname_s)
        if param is None:
            if pname_s in _all_param_names():
                notes.append(f"{name}.{pname_s} is not a parameter of {method.name}; it has no effect "
                             f"(mergekit ignores it too).")
            else:
                known = ", ".join(p.name for p in method.params) or "none"
                problems.add(f"{name}.{_name(pname)}", f"not a parameter of {method.name}"
                                                      f"{_did_you_mean(pname_s, [p.name for p in method.params])} "
                                                      f"(its parameters: {known}).")
            continue
        if not shared and not param.per_model:
            problems.add(f"{name}.{pname_s}", f"{pname_s} applies to the whole merge, not to one model; "
                                              f"move it to the top-level `parameters:`.")
            continue
        if is_base and param.scope == "model":
            continue  # mergekit gives the base no per-fine-tune parameters: ignored there too
        setting = _setting(value, param, f"{name}.{pname_s}", problems)
        if setting is not _INVALID:
            out[pname_s] = setting
    return out


_INVALID = object()


def _setting(value: Any, param: Param, name: str, problems: _Problems) -> Any:
    """A parameter as mergekit allows it: a value; a gradient (a list of values, interpolated over
    the layers); or a list of {filter: SUBSTRING, value: VALUE-OR-GRADIENT}, the first whose
    filter is in the tensor's name (or is absent or '*') applying. Every value is checked."""
    before = len(problems.items)

    def check(v: Any, n: str) -> Any:
        try:
            return param.check(v)
        except ValueError as e:
            problems.add(n, f"{e}.")
            return None

    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        out = check(value, name)
    elif not value:
        problems.add(name, "an empty list; give a value, a gradient [a, b, ...] or [{filter: ..., value: ...}].")
        return _INVALID
    elif all(not isinstance(v, (dict, list)) for v in value):
        out = [check(v, f"{name}[{i}]") for i, v in enumerate(value)]
    else:
        out = []
        for i, cond in enumerate(value):
            if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
                problems.add(f"{name}[{i}]", "expected {filter: SUBSTRING, value: VALUE} (filter optional).")
                continue
            filt = cond.get("filter")
            if filt is not None and not isinstance(filt, str):
                problems.add(f"{name}[{i}].filter", "expected a substring of tensor names, such as self_attn.")
                continue
            inner = cond["value"]
            if isinstance(inner, list):
                if not inner or any(isinstance(v, (dict, list)) for v in inner):
                    problems.add(f"{name}[{i}].value", "expected a value or a gradient [a, b, ...].")
                    continue
                inner = [check(v, f"{name}[{i}].value[{j}]") for j, v in enumerate(inner)]
            else:
                inner = check(inner, f"{name}[{i}].value")
            out.append({"filter": filt, "value": inner})
    return _INVALID if len(problems.items) > before else out


_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|h|blocks|layer)\.)(\d+)(\..+)$")


def split_layer(tensor: str) -> tuple[str, int, str] | None:
    """(prefix, layer index, suffix) of a tensor inside a layer ("model.layers.", 3,
    ".mlp.up_proj.weight"); None outside the layers."""
    match = _LAYER.match(tensor)
    return (match.group(1), int(match.group(2)), match.group(3)) if match else None


def layer_index(tensor: str) -> int | None:
    split = split_layer(tensor)
    return split[1] if split else None


def layer_position(tensor: str, num_layers: int) -> float:
    """mergekit's t: layer i of L at i / (L - 1) (1 when L is 1); 0 outside the layers."""
    i = layer_index(tensor)
    if i is None:
        return 0.0
    return i / (num_layers - 1) if num_layers > 1 else 1.0


def resolve(setting: Any, tensor: str, t: float) -> Any:
    """mergekit's `evaluate_setting`: the value of a setting for one tensor at layer position t
    (0 for the first layer and for tensors outside the layers, 1 for the last); None when a
    filtered list has no entry for this tensor."""
    if setting is None or isinstance(setting, (bool, int, float)):
        return setting
    if all(not isinstance(v, dict) for v in setting):
        if any(isinstance(v, bool) or v is None for v in setting):  # discrete: no interpolation
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if cond["filter"] is None or cond["filter"] == "*" or cond["filter"] in tensor:
            return resolve(cond["value"], tensor, t)
    return None


# -- the rest of the fields ------------------------------------------------------------------------

def _calibration(raw: Any, has_base: bool, method: str | None, problems: _Problems, source: str) -> CalibrationSpec:
    """`calibrate:` true, false or options. Not written: on wherever the merge has a base model."""
    if raw is None:
        return CalibrationSpec(enabled=has_base)
    if not isinstance(raw, dict):
        try:
            enabled = as_bool(raw)
        except ValueError:
            problems.add("calibrate", f"expected true, false or a mapping such as {{alpha: 0.5, skip: ['*lm_head*']}} "
                                      f"(got {show(raw)}).")
            return CalibrationSpec(enabled=False)
        raw = {"enabled": enabled}
    known = {"enabled", "alpha", "side", "target", "skip"}
    for key in raw:
        if key not in known:
            problems.add(f"calibrate.{_name(key)}", f"unknown option. Options: {', '.join(sorted(known))}.")
    enabled = True
    try:
        enabled = as_bool(raw.get("enabled", True))
    except ValueError as e:
        problems.add("calibrate.enabled", f"{e}.")
    if enabled and not has_base:
        problems.add("calibrate", _no_base_for_calibration(source, method, "calibrate: true").split(": ", 1)[1])
    alpha = raw.get("alpha")
    if alpha is not None:
        try:
            alpha = Param("alpha", low=0.0).check(alpha)
        except ValueError as e:
            problems.add("calibrate.alpha", f"{e}; alpha > 0 bounds how much a direction may grow (1/alpha).")
            alpha = None
    side = raw.get("side", "column")
    if side not in ("column", "row"):
        problems.add("calibrate.side", f"{show(side)} is not one of: column, row.")
    target = raw.get("target")
    if target is not None and (isinstance(target, bool) or not isinstance(target, int) or target < 0):
        problems.add("calibrate.target", f"must be a fine-tune's index, 0 for the first (got {show(target)}).")
        target = None
    skip = raw.get("skip", list(DEFAULT_SKIP))
    if isinstance(skip, str):
        skip = [skip]
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        problems.add("calibrate.skip", "expected a list of name patterns such as ['*embed*', '*lm_head*'].")
        skip = list(DEFAULT_SKIP)
    return CalibrationSpec(enabled=enabled, alpha=alpha, side=side if side in ("column", "row") else "column",
                           target=target, skip=tuple(skip))


def _tokenizer(raw: dict, problems: _Problems) -> TokenizerSpec | None:
    """`tokenizer_source:` or `tokenizer: {source, tokens, pad_to_multiple_of}` (not both)."""
    simple, full = raw.get("tokenizer_source"), raw.get("tokenizer")
    if simple is not None and full is not None:
        problems.add("tokenizer", "write `tokenizer:` or `tokenizer_source:`, not both (mergekit refuses both too).")
        return None
    if simple is not None:
        source = _tokenizer_source(simple, "tokenizer_source", problems)
        return None if source is None else TokenizerSpec(source)
    if full is None:
        return None
    if not isinstance(full, dict):
        problems.add("tokenizer", f"expected a mapping such as {{source: union, tokens: {{...}}}} (got {show(full)}).")
        return None
    for key in full:
        if key not in ("source", "tokens", "pad_to_multiple_of"):
            problems.add(f"tokenizer.{_name(key)}", "unknown option. Options: pad_to_multiple_of, source, tokens.")
    source = _tokenizer_source(full.get("source", "union"), "tokenizer.source", problems)
    pad = full.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        problems.add("tokenizer.pad_to_multiple_of", f"expected a positive integer (got {show(pad)}).")
        pad = None
    tokens = []
    raw_tokens = full.get("tokens") or {}
    if not isinstance(raw_tokens, dict):
        problems.add("tokenizer.tokens", "expected a mapping of token -> {source: ..., force: false}.")
        raw_tokens = {}
    for token, cfg in raw_tokens.items():
        name = f"tokenizer.tokens.{_name(token)}"
        if not isinstance(token, str):
            problems.add(name, "a token is a string.")
            continue
        cfg = {} if cfg is None else cfg
        if not isinstance(cfg, dict) or set(cfg) - {"source", "force"}:
            problems.add(name, "expected {source: ..., force: true|false}.")
            continue
        force = False
        try:
            force = as_bool(cfg.get("force", False))
        except ValueError as e:
            problems.add(f"{name}.force", f"{e}.")
        token_source = _token_source(cfg.get("source"), f"{name}.source", problems)
        if token_source is not None:
            tokens.append((token, token_source, force))
    return None if source is None else TokenizerSpec(source, tuple(tokens), pad)


def _tokenizer_source(value: Any, name: str, problems: _Problems) -> str | None:
    if value in ("base", "union"):
        return value
    if isinstance(value, str) and value.strip():
        text = value.removeprefix("model:")  # the spelling of older mergekit documentation
        return str(local_path(text))
    problems.add(name, f"expected base, union or a model's path (got {show(value)}).")
    return None


def _token_source(value: Any, name: str, problems: _Problems) -> TokenSource | None:
    if value is None:
        return TokenSource("default")
    if isinstance(value, str):
        return TokenSource("model", str(local_path(value)))
    if isinstance(value, dict) and value.get("kind") == "zero" and set(value) == {"kind"}:
        return TokenSource("zero")
    if isinstance(value, dict) and value.get("kind") == "model_token" and isinstance(value.get("model"), str) \
            and set(value) <= {"kind", "model", "token", "token_id"} \
            and (("token" in value) != ("token_id" in value)):
        token, token_id = value.get("token"), value.get("token_id")
        if (token is not None and not isinstance(token, str)) or (
                token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0)):
            problems.add(name, "token is a string and token_id a non-negative integer.")
            return None
        return TokenSource("model_token", str(local_path(value["model"])), token, token_id)
    problems.add(name, f"expected a model's path, {{kind: zero}} or {{kind: model_token, model: PATH, token: TOKEN}} "
                       f"(or token_id: ID) (got {show(value)}).")
    return None


def _chat_template(value: Any, problems: _Problems) -> str | None:
    """mergekit's `chat_template`: a template's name (chatml, llama3, ...), auto (the most common
    template among the models) or the Jinja template itself."""
    if value is None:
        return None
    if not isinstance(value, str):
        problems.add("chat_template", f"expected a template's name ({', '.join(CHAT_TEMPLATE_NAMES)}), auto, or a "
                                      f"Jinja template (got {show(value)}).")
        return None
    if value == "auto" or value in CHAT_TEMPLATE_NAMES or (len(value) >= 20 and "{" in value):
        return value
    problems.add("chat_template", f"{show(value)} is neither a template's name ({', '.join(CHAT_TEMPLATE_NAMES)}), "
                                  f"auto, nor a Jinja template.")
    return None


def _output(raw: Any, problems: _Problems) -> OutputSpec:
    if raw is None:
        return OutputSpec()
    if isinstance(raw, str):
        raw = {"format": raw}
    if not isinstance(raw, dict):
        problems.add("output", "expected a mapping such as {format: zarr, compression: zstd}.")
        return OutputSpec()
    options = all_options()
    known = sorted({"format", *options})
    for key in raw:
        if key not in known:
            problems.add(f"output.{_name(key)}", f"unknown option. Options: {', '.join(known)}.")
    fmt = raw.get("format", DEFAULT_FORMAT)
    if fmt not in OUTPUT_FORMATS:
        problems.add("output.format", f"{show(fmt)} is not one of: {', '.join(OUTPUT_FORMATS)}.")
        fmt = DEFAULT_FORMAT
    values, found = OUTPUT_FORMATS[fmt].read_options({k: v for k, v in raw.items() if k in options})
    for option, message in found:
        problems.add(f"output.{option}", message)
    return OutputSpec(fmt, values, given=True)


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '5B' (mergekit: 5 billion) or a plain byte count."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}
    suffix = next((u for u in units if s.endswith(u)), "")
    number, factor = s[: len(s) - len(suffix)], units.get(suffix, 1)
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0 or value * factor >= 2**63:
        raise DistSvcError(f"size {show(text)} is not a positive size; write e.g. 5GB, 500MB or 2GiB.")
    return max(1, int(value * factor))


def _dtype(value: Any, name: str, problems: _Problems) -> str:
    text = value.removeprefix("torch.").lower() if isinstance(value, str) else None
    if text not in _DTYPES:
        problems.add(name, f"{show(value)} is not a supported dtype. Use one of: float32, float16, bfloat16, float64.")
        return "float32"
    return _DTYPES[text]


def _name(key: Any) -> str:
    """A key as a field name in messages: itself when a short string, else a short repr."""
    return key if isinstance(key, str) and len(key) <= 60 and key.isprintable() else show(key)


def _did_you_mean(word: Any, choices) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ""
