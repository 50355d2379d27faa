"""The merge configuration: a superset of mergekit's YAML, parsed once into typed objects.

Everything downstream receives a validated `MergeConfig`; every error here names the file and
the field and says what to write instead. Field names follow mergekit so that a mergekit
`task_arithmetic` YAML runs unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dist_svc.errors import DistSvcError
from dist_svc.methods import METHODS
from dist_svc.storage.output import FORMATS as OUTPUT_FORMATS

# Names containing these are embedding-like and skipped by calibration by default: the authors
# skip "embedding"; in LLM checkpoints that is embed_tokens / wte / wpe and the tied-shape lm_head.
DEFAULT_SKIP = ("*embed*", "*wte*", "*wpe*", "*lm_head*")

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64", "double": "float64",
}

# mergekit fields that dist-svc knows about but does not implement: refused by name, never ignored.
_UNSUPPORTED_TOP = {
    "slices": "layer slicing (passthrough/frankenmerges) is not supported; merge whole models",
    "modules": "per-module configurations are not supported; use one merge_method for the model",
    "tokenizer": "tokenizer merging is not supported; the base model's tokenizer is copied",
    "chat_template": "chat templates are copied from the base model; remove this field",
}
_KNOWN_TOP = {
    "merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "calibrate",
    "tokenizer_source", "name", "output",
}
DEFAULT_SHARD_BYTES = 5 * 10**9  # as transformers' and mergekit's default of "5GB"


@dataclass(frozen=True)
class ModelSpec:
    path: Path | str  # a local path, or a URL / Hub ID / MODEL+ADAPTER (dist_svc.storage.source_of)
    weight: Any = 1.0  # a number, or a setting: a gradient [a, b, ...] or filtered values (see resolve)
    density: Any = 1.0  # TIES/DARE: the fraction of each task vector kept
    # The model's own settings as written (highest precedence), for per-tensor resolution.
    own: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CalibrationSpec:
    """Singular Value Calibration options (see docs/calibration.md)."""

    enabled: bool = True
    alpha: float | None = None  # None: 1/K, resolved by `resolved_alpha`
    side: str = "column"
    target: int | None = None  # index into `models` (0-based) to calibrate against one task
    skip: tuple[str, ...] = DEFAULT_SKIP

    def resolved_alpha(self, k: int) -> float:
        return self.alpha if self.alpha is not None else 1.0 / k

    def with_alpha(self, alpha: float) -> "CalibrationSpec":
        return CalibrationSpec(self.enabled, alpha, self.side, self.target, self.skip)


@dataclass(frozen=True)
class OutputSpec:
    """How the merged model is stored (dist_svc.storage.output): Hugging Face safetensors
    shards of at most `shard_bytes`, or a zarr v3 store (`compression: zstd` or none)."""

    format: str = "safetensors"
    compression: str = "none"
    shard_bytes: int = DEFAULT_SHARD_BYTES
    given: bool = field(default=False, compare=False)  # written in the config (else OUT_DIR's suffix may choose)

    def options(self) -> dict[str, Any]:
        """What the layout needs, and what decides its bytes (part of the fingerprint)."""
        if self.format == "safetensors":
            return {"shard_bytes": self.shard_bytes}
        return {"compression": self.compression}


@dataclass(frozen=True)
class MergeConfig:
    merge_method: str
    base_model: Path | str
    models: tuple[ModelSpec, ...]
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    out_dtype: str | None = None
    calibration: CalibrationSpec = CalibrationSpec()
    output: OutputSpec = OutputSpec()
    source: str = "<config>"

    @property
    def k(self) -> int:
        return len(self.models)

    def with_calibration(self, enabled: bool | None) -> "MergeConfig":
        if enabled is None or enabled == self.calibration.enabled:
            return self
        return dataclasses.replace(self, calibration=dataclasses.replace(self.calibration, enabled=enabled))

    def with_output(self, fmt: str | None = None, shard_bytes: int | None = None) -> "MergeConfig":
        output = self.output
        if fmt is not None:
            output = dataclasses.replace(output, format=fmt)
        if shard_bytes is not None:
            output = dataclasses.replace(output, shard_bytes=shard_bytes)
        return dataclasses.replace(self, output=output)

    def resolved(self, tensor: str, t: float) -> tuple[dict[str, Any], tuple[dict[str, float], ...]]:
        """The method's parameters and each model's (weight, density) for one tensor at layer
        position t in [0, 1], resolving gradients and filters as mergekit does: a model's own
        setting first, then `parameters:`; a filtered list whose filters all miss falls through
        to the next; then the default."""
        method = METHODS[self.merge_method]
        params = {}
        for name, spec in method.parameters.items():
            value = resolve(self.parameters.get(name), tensor, t)
            params[name] = spec.default if value is None else (
                spec.kind(value) if spec.kind is not float else float(value))
        models = []
        for m in self.models:
            values = {}
            for pname in ("weight", "density"):
                value = resolve(m.own.get(pname), tensor, t)
                if value is None:
                    value = resolve(self.parameters.get(pname), tensor, t)
                values[pname] = float(value) if value is not None else 1.0
            models.append(values)
        return params, tuple(models)

    @property
    def has_settings(self) -> bool:
        """True when some parameter varies by tensor (a gradient or a filter)."""
        return any(not isinstance(v, (int, float, bool)) for v in self.parameters.values()) or any(
            not isinstance(v, (int, float)) for m in self.models for v in m.own.values())

    def fingerprint_dict(self) -> dict[str, Any]:
        """What determines the output bytes, in a stable JSON-able form (no source path)."""
        return {
            "merge_method": self.merge_method,
            "base_model": str(self.base_model),
            "models": [{"model": str(m.path), "weight": m.weight, "density": m.density,
                        **({"parameters": m.own} if self.has_settings else {})} for m in self.models],
            "parameters": dict(sorted(self.parameters.items())),
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
            "calibrate": {
                "enabled": self.calibration.enabled,
                "alpha": self.calibration.resolved_alpha(self.k) if self.calibration.enabled else None,
                "side": self.calibration.side,
                "target": self.calibration.target,
                "skip": list(self.calibration.skip),
            },
            "output": {"format": self.output.format, **self.output.options()},
        }


def load_config(path: str | Path, calibrate: bool | None = None) -> MergeConfig:
    """Read a YAML config file; `calibrate` (the CLI flag) overrides the file's `calibrate:`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise DistSvcError(f"cannot read config file {path}: {e.strerror}.") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DistSvcError(f"{path} is not valid YAML: {e}") from None
    return parse_config(raw, source=str(path)).with_calibration(calibrate)


def parse_config(raw: Any, source: str = "<config>") -> MergeConfig:
    where = source

    def fail(field_name: str, msg: str) -> DistSvcError:
        return DistSvcError(f"{where}: field '{field_name}': {msg}")

    if not isinstance(raw, dict):
        raise DistSvcError(f"{where}: expected a YAML mapping with 'merge_method', 'base_model' and 'models'.")

    for key in raw:
        if key in _UNSUPPORTED_TOP:
            raise fail(key, _UNSUPPORTED_TOP[key] + ".")
        if key not in _KNOWN_TOP:
            raise fail(key, f"unknown field. Known fields: {', '.join(sorted(_KNOWN_TOP))}.")

    method_name = raw.get("merge_method")
    if method_name is None:
        raise fail("merge_method", f"missing. Choose one of: {', '.join(sorted(METHODS))}.")
    if method_name not in METHODS:
        raise fail("merge_method", f"'{method_name}' is not supported. Choose one of: {', '.join(sorted(METHODS))}.")
    method = METHODS[method_name]

    tokenizer_source = raw.get("tokenizer_source", "base")
    if tokenizer_source != "base":
        raise fail("tokenizer_source", f"'{tokenizer_source}' is not supported; only 'base' (the default) is.")

    base = raw.get("base_model")
    if not isinstance(base, str) or not base:
        raise fail("base_model", "missing or not a path. Set it to the directory of the base checkpoint.")
    base_path = _resolve_path(base)

    params_raw = raw.get("parameters") or {}
    if not isinstance(params_raw, dict):
        raise fail("parameters", "expected a mapping such as {lambda: 1.0}.")
    model_param_names = method.model_parameters
    parameters: dict[str, Any] = {}
    for pname, spec in method.parameters.items():
        parameters[pname] = _setting(params_raw.get(pname, spec.default), spec, f"parameters.{pname}", fail)
    # As in mergekit, a per-model parameter given under `parameters:` is every model's default.
    model_defaults = {"weight": 1.0, "density": parameters.get("density", 1.0)}
    if "weight" in params_raw:
        model_defaults["weight"] = _setting(params_raw["weight"], None, "parameters.weight", fail)
        parameters["weight"] = model_defaults["weight"]
    for pname in params_raw:
        if pname not in method.parameters and pname != "weight":
            known = ", ".join(list(method.parameters) + ["weight"])
            raise fail(f"parameters.{pname}", f"not a parameter of {method_name} (its parameters: {known}).")

    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise fail("models", "missing or empty. List the fine-tuned checkpoints as '- model: PATH'.")
    models: list[ModelSpec] = []
    for i, entry in enumerate(models_raw):
        fname = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise fail(fname, "expected a mapping with 'model: PATH'.")
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise fail(f"{fname}.{sorted(extra)[0]}", "unknown field; a model entry has 'model' and 'parameters'.")
        mpath = _resolve_path(entry["model"])
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise fail(f"{fname}.parameters", "expected a mapping such as {weight: 1.0}.")
        values = dict(model_defaults)
        own = {}
        for pname, pval in params.items():
            if pname not in model_param_names:
                raise fail(f"{fname}.parameters.{pname}", f"not a per-model parameter of {method_name}; "
                                                          f"per-model parameters: {', '.join(model_param_names)}.")
            spec = method.parameters.get(pname)
            values[pname] = own[pname] = _setting(pval, spec, f"{fname}.parameters.{pname}", fail)
        if mpath == base_path:
            # mergekit lists the base among the models at times; its task vector is zero, and
            # mergekit leaves it out of the merge. So do we.
            continue
        models.append(ModelSpec(path=mpath, weight=values["weight"], density=values["density"], own=own))
    if not models:
        raise fail("models", "lists only the base model; add at least one fine-tuned checkpoint.")

    dtype = _dtype(raw.get("dtype", "float32"), "dtype", fail)
    out_dtype = raw.get("out_dtype")
    out_dtype = None if out_dtype is None else _dtype(out_dtype, "out_dtype", fail)

    calibration = _calibration(raw.get("calibrate", True), len(models), fail)
    if calibration.alpha is None and method.alpha_is_one:
        calibration = calibration.with_alpha(1.0)
    return MergeConfig(
        merge_method=method_name, base_model=base_path, models=tuple(models), parameters=parameters,
        dtype=dtype, out_dtype=out_dtype, calibration=calibration, output=_output(raw.get("output"), fail),
        source=source,
    )


def _output(raw: Any, fail) -> OutputSpec:
    if raw is None:
        return OutputSpec()
    if isinstance(raw, str):
        raw = {"format": raw}
    if not isinstance(raw, dict):
        raise fail("output", "expected a mapping such as {format: zarr, compression: zstd}.")
    for key in raw:
        if key not in ("format", "compression", "shard_size"):
            raise fail(f"output.{key}", "unknown option. Options: compression, format, shard_size.")
    fmt = raw.get("format", "safetensors")
    if fmt not in OUTPUT_FORMATS:
        raise fail("output.format", f"'{fmt}' is not one of: {', '.join(OUTPUT_FORMATS)}.")
    compression = raw.get("compression", "none")
    if compression not in ("none", "zstd"):
        raise fail("output.compression", f"'{compression}' is not one of: none, zstd.")
    if compression != "none" and fmt != "zarr":
        raise fail("output.compression", "only zarr output is compressed; safetensors files are not.")
    shard_bytes = DEFAULT_SHARD_BYTES
    if "shard_size" in raw:
        try:
            shard_bytes = parse_size(raw["shard_size"])
        except DistSvcError as e:
            raise fail("output.shard_size", str(e)) from None
    return OutputSpec(fmt, compression, shard_bytes, given=True)


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
        raise DistSvcError(f"size '{text}' is not a positive size; write e.g. 5GB, 500MB or 2GiB.")
    return max(1, int(value * factor))


def _calibration(raw: Any, k: int, fail) -> CalibrationSpec:
    if raw is True or raw is None:
        return CalibrationSpec()
    if raw is False:
        return CalibrationSpec(enabled=False)
    if not isinstance(raw, dict):
        raise fail("calibrate", "expected true, false or a mapping such as {alpha: 0.5, skip: ['*lm_head*']}.")
    known = {"enabled", "alpha", "side", "target", "skip"}
    for key in raw:
        if key not in known:
            raise fail(f"calibrate.{key}", f"unknown option. Options: {', '.join(sorted(known))}.")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise fail("calibrate.enabled", "expected true or false.")
    alpha = raw.get("alpha")
    if alpha is not None:
        alpha = _number(alpha, "calibrate.alpha", fail)
        if not alpha > 0:
            raise fail("calibrate.alpha", f"must be > 0 (got {alpha}); it bounds how much a direction may grow (1/alpha).")
    side = raw.get("side", "column")
    if side not in ("column", "row"):
        raise fail("calibrate.side", f"'{side}' is not one of: column, row.")
    target = raw.get("target")
    if target is not None:
        if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < k:
            raise fail("calibrate.target", f"must be a model index from 0 to {k - 1} (got {target!r}).")
    skip = raw.get("skip", list(DEFAULT_SKIP))
    if isinstance(skip, str):
        skip = [skip]
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise fail("calibrate.skip", "expected a list of name patterns such as ['*embed*', '*lm_head*'].")
    return CalibrationSpec(enabled=enabled, alpha=alpha, side=side, target=target, skip=tuple(skip))


def _resolve_path(text: str) -> Path | str:
    # Like mergekit, model paths are taken relative to the working directory; URLs, Hub IDs and
    # MODEL+ADAPTER stay strings (dist_svc.storage.source_of).
    from dist_svc.storage import source_of

    return source_of(text)


def _setting(value: Any, spec, name: str, fail) -> Any:
    """A parameter as mergekit allows it: a value; a gradient (a list of values, interpolated over
    the layers); or a list of {filter: SUBSTRING, value: VALUE-OR-GRADIENT}, the first whose
    filter is in the tensor's name (or is absent or '*') applying. Every value is checked."""
    check = (lambda v, n: _param(v, spec, n, fail)) if spec is not None else (lambda v, n: _number(v, n, fail))
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return check(value, name)
    if not value:
        raise fail(name, "an empty list; give a value, a gradient [a, b, ...] or [{filter: ..., value: ...}].")
    if all(not isinstance(v, (dict, list)) for v in value):
        return [check(v, f"{name}[{i}]") for i, v in enumerate(value)]
    out = []
    for i, cond in enumerate(value):
        if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
            raise fail(f"{name}[{i}]", "expected {filter: SUBSTRING, value: VALUE} (filter optional).")
        filt = cond.get("filter")
        if filt is not None and not isinstance(filt, str):
            raise fail(f"{name}[{i}].filter", "expected a substring of tensor names, such as self_attn.")
        inner = cond["value"]
        if isinstance(inner, list):
            if not inner or any(isinstance(v, (dict, list)) for v in inner):
                raise fail(f"{name}[{i}].value", "expected a value or a gradient [a, b, ...].")
            inner = [check(v, f"{name}[{i}].value[{j}]") for j, v in enumerate(inner)]
        else:
            inner = check(inner, f"{name}[{i}].value")
        out.append({"filter": filt, "value": inner})
    return out


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_index(tensor: str) -> int | None:
    match = _LAYER.search(tensor)
    return int(match.group(1)) if match else None


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
        if any(isinstance(v, bool) for v in setting):  # discrete: no interpolation
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


def _number(value: Any, name: str, fail) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(name, f"expected a number (got {value!r}).")
    if not math.isfinite(value):
        raise fail(name, f"must be finite (got {value}).")
    return float(value)


def _param(value: Any, spec, name: str, fail) -> Any:
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise fail(name, f"expected true or false (got {value!r}).")
        return value
    if spec.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise fail(name, f"expected an integer (got {value!r}).")
    number = _number(value, name, fail)
    if spec.low is not None:
        above = number >= spec.low if spec.low_inclusive else number > spec.low
        if not above or not number <= spec.high:
            interval = f"{'[' if spec.low_inclusive else '('}{spec.low:g}, {spec.high:g}]"
            raise fail(name, f"must be in {interval} (got {number:g}).")
    return int(value) if spec.kind is int else number


def _dtype(value: Any, name: str, fail) -> str:
    if not isinstance(value, str) or value.lower() not in _DTYPES:
        raise fail(name, f"'{value}' is not a supported dtype. Use one of: float32, float16, bfloat16, float64.")
    return _DTYPES[value.lower()]
