"""The merge configuration: a superset of mergekit's YAML, parsed once into typed objects.

Everything downstream receives a validated `MergeConfig`; every error here names the file and
the field and says what to write instead. Field names follow mergekit so that a mergekit
`task_arithmetic` YAML runs unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dist_svc.errors import DistSvcError
from dist_svc.methods import METHODS

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
OUTPUT_FORMATS = ("safetensors", "zarr")


@dataclass(frozen=True)
class ModelSpec:
    path: Path
    weight: float = 1.0
    density: float = 1.0  # TIES/DARE: the fraction of each task vector kept


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
    """How the merged model is stored: Hugging Face safetensors shards, or a zarr v3 store
    (`compression: zstd` or none)."""

    format: str = "safetensors"
    compression: str = "none"


@dataclass(frozen=True)
class MergeConfig:
    merge_method: str
    base_model: Path
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

    def with_output_format(self, fmt: str | None) -> "MergeConfig":
        if fmt is None or fmt == self.output.format:
            return self
        return dataclasses.replace(self, output=dataclasses.replace(self.output, format=fmt))

    def fingerprint_dict(self) -> dict[str, Any]:
        """What determines the output bytes, in a stable JSON-able form (no source path)."""
        return {
            "merge_method": self.merge_method,
            "base_model": str(self.base_model),
            "models": [{"model": str(m.path), "weight": m.weight, "density": m.density} for m in self.models],
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
            "output": {"format": self.output.format, "compression": self.output.compression},
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
        parameters[pname] = _param(params_raw.get(pname, spec.default), spec, f"parameters.{pname}", fail)
    # As in mergekit, a per-model parameter given under `parameters:` is every model's default.
    model_defaults = {"weight": 1.0, "density": parameters.get("density", 1.0)}
    if "weight" in params_raw:
        model_defaults["weight"] = _number(params_raw["weight"], "parameters.weight", fail)
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
        for pname, pval in params.items():
            if pname not in model_param_names:
                raise fail(f"{fname}.parameters.{pname}", f"not a per-model parameter of {method_name}; "
                                                          f"per-model parameters: {', '.join(model_param_names)}.")
            spec = method.parameters.get(pname)
            values[pname] = _param(pval, spec, f"{fname}.parameters.{pname}", fail) if spec \
                else _number(pval, f"{fname}.parameters.{pname}", fail)
        if mpath == base_path:
            # mergekit lists the base among the models at times; its task vector is zero, and
            # mergekit leaves it out of the merge. So do we.
            continue
        models.append(ModelSpec(path=mpath, weight=values["weight"], density=values["density"]))
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
        if key not in ("format", "compression"):
            raise fail(f"output.{key}", "unknown option. Options: compression, format.")
    fmt = raw.get("format", "safetensors")
    if fmt not in OUTPUT_FORMATS:
        raise fail("output.format", f"'{fmt}' is not one of: {', '.join(OUTPUT_FORMATS)}.")
    compression = raw.get("compression", "none")
    if compression not in ("none", "zstd"):
        raise fail("output.compression", f"'{compression}' is not one of: none, zstd.")
    if compression != "none" and fmt != "zarr":
        raise fail("output.compression", "only zarr output is compressed; safetensors files are not.")
    return OutputSpec(fmt, compression)


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


def _resolve_path(text: str) -> Path:
    # Like mergekit, model paths are taken relative to the working directory.
    return Path(text).expanduser().resolve()


def _number(value: Any, name: str, fail) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, (list, dict)):
            raise fail(name, "gradients and per-tensor filters are not supported; give a single number.")
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
