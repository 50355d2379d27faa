"""Parsing and validating a merge config: mergekit's YAML (and a few dist-svc fields) into a
`MergeConfig` (dist_svc.config.schema).

Field names are mergekit's, so a mergekit config runs unchanged: `models:` or `slices:`,
`merge_method`, `base_model`, `parameters` (values, layer gradients and filters, per model or
global, each checked against the method's declaration), `dtype`, `out_dtype`, `tokenizer_source`
/ `tokenizer`, `chat_template`; dist-svc adds `calibrate` and `output` (its options checked by
the output format, dist_svc.storage.output). Every problem found is reported at once, in one
`DistSvcError` that names the file and each field and says what to write instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from pathlib import Path
from typing import Any

from dist_svc.config.schema import (
    DEFAULT_SKIP, CalibrationSpec, MergeConfig, OutputSpec, SliceSpec, SourceSpec, TokenizerSpec, TokenSource,
    no_base_for_calibration,
)
from dist_svc.config.yaml import read_documents
from dist_svc.errors import DistSvcError
from dist_svc.methods import METHODS, Method, Param
from dist_svc.methods.base import as_bool, show
from dist_svc.storage import source_of
from dist_svc.storage.durable import local_path
from dist_svc.storage.output import DEFAULT_FORMAT, FORMATS as OUTPUT_FORMATS, all_options

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
            problems.add("calibrate", no_base_for_calibration(source, method_name, "--calibrate").split(": ", 1)[1])
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


def load_config(path: str | Path, calibrate: bool | None = None) -> MergeConfig:
    """Read a YAML config file of one merge; `calibrate` (the CLI flag) overrides the file's
    `calibrate:`. A file of several merges (stages) is read with dist_svc.stages."""
    documents = read_documents(path)
    if len(documents) != 1:
        raise DistSvcError(f"{path} holds {len(documents)} merges (YAML documents, mergekit-multimerge's stages); "
                           f"run it with `dist-svc merge {path} OUT_DIR`, which runs them in order.")
    return parse_config(documents[0], source=str(path), calibrate=calibrate)


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
        problems.add("calibrate", no_base_for_calibration(source, method, "calibrate: true").split(": ", 1)[1])
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
