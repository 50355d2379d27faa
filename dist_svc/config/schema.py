"""The merge configuration as typed objects: what `parse_config` (dist_svc.config.validate)
builds from a mergekit YAML, and everything downstream receives. Field names are mergekit's."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from dist_svc.errors import DistSvcError
from dist_svc.methods import METHODS, Method
from dist_svc.storage.output import DEFAULT_FORMAT, FORMATS as OUTPUT_FORMATS, all_options

# Names containing these are embedding-like and skipped by calibration by default: the authors
# skip "embedding"; in LLM checkpoints that is embed_tokens / wte / wpe and the tied-shape lm_head.
DEFAULT_SKIP = ("*embed*", "*wte*", "*wpe*", "*lm_head*")


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
            raise DistSvcError(no_base_for_calibration(self.source, self.merge_method, "--calibrate"))
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


def no_base_for_calibration(source: str, method: str | None, how: str) -> str:
    return (f"{source}: calibration ({how}) needs a base model: it rescales the merged delta (merged - base) "
            f"against the task vectors (fine-tune - base). Set `base_model:`, or turn calibration off "
            f"(`calibrate: false`, --no-calibrate) to run {method or 'this method'} without one.")
