"""PEFT LoRA adapters as models: a checkpoint (`inner`, usually the merge's base) changed by an
adapter directory (`adapter_config.json` + `adapter_model.safetensors` or `.bin`).

The model's tensors are the inner checkpoint's; an adapted tensor W changes by

    delta W = scale * B @ A          scale = lora_alpha / r   (lora_alpha / sqrt(r) with rsLoRA)

(transposed for embeddings and `fan_in_fan_out` layers; `rank_pattern` and `alpha_pattern` per
module as PEFT matches them), and an adapted bias by `scale * lora_B.bias`. `delta(name, rows,
cols)` gives exactly that block, from B's rows and A's columns, in float64: the worker uses it
as the task vector without ever forming the adapted weights (dist_svc.blocks). `read` gives the
adapted weights themselves, rounded once to the stored dtype, as PEFT's `merge_and_unload` would
(what `convert` writes). Full tensors saved with the adapter (`modules_to_save`, an embedding's
`base_layer`) replace the inner checkpoint's.

Refused, naming the key or option: DoRA (its magnitude vector makes the change non-linear in B
and A), other PEFT types, options that change the arithmetic (`layer_replication`,
`target_parameters`, ...), an adapter for another base: a module missing from the inner
checkpoint or factors whose shapes do not fit its tensor, two keys for one factor (two adapters
in one file), and a pattern field that is not a mapping of valid keys to positive numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass

import torch

from dist_svc.errors import DistSvcError
from dist_svc.storage.location import quote
from dist_svc.storage.peft_patterns import UnsupportedPattern, compile_key, matches
from dist_svc.storage.types import Checkpoint, TensorInfo

CONFIG_NAME = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
# Options that change what the adapter computes; dist-svc refuses them rather than ignore them.
REFUSED_OPTIONS = ("layer_replication", "target_parameters", "use_qalora", "use_bdlora", "trainable_token_indices",
                   "alora_invocation_tokens", "lora_ga_config", "kasa_config", "arrow_config", "use_kasa")


@dataclass(frozen=True)
class Factors:
    """How one tensor changes: scale * B @ A (transposed when `transpose`), or scale * bias."""

    a: str | None  # key of A in the adapter's weights (None for a bias)
    b: str  # key of B (or of lora_B.bias)
    scale: float
    transpose: bool  # embeddings and fan_in_fan_out layers store W as (B @ A)^T


class LoraCheckpoint:
    def __init__(self, loc, inner: Checkpoint, weights: Checkpoint, source: str, extra_identity: dict | None = None,
                 identity_only: bool = False):
        """`identity_only`: only what `identity()` and `side_file()` need (the inner checkpoint and
        the weights may then hold no tensors; nothing is matched against them)."""
        self.loc, self.inner, self.weights = loc, inner, weights
        self.source = source
        raw = loc.read_bytes(CONFIG_NAME)
        try:
            config = json.loads(raw)
            assert isinstance(config, dict)
        except (TypeError, ValueError, AssertionError):
            raise DistSvcError(f"{loc.where(CONFIG_NAME)}: not a valid PEFT adapter config (a JSON object).") from None
        self.config = config
        self.factors: dict[str, Factors] = {}
        self.full: dict[str, str] = {}  # inner tensor -> adapter key of the full tensor replacing it
        self._base_layers: set[str] = set()  # full tensors saved as an adapted layer's `base_layer`
        self._same: dict[str, bool] = {}  # base_layer tensors found equal to the inner's
        if not identity_only:
            self._check_config(config)
            self._patterns = {field: _patterns(config.get(field), field, loc.where(CONFIG_NAME))
                              for field in ("rank_pattern", "alpha_pattern")}
            self._map_keys(config)
        self.tensors: dict[str, TensorInfo] = {
            name: (TensorInfo(name, weights.tensors[self.full[name]].dtype, info.shape, weights.tensors[self.full[name]].where)
                   if name in self.full else info)
            for name, info in inner.tensors.items()}
        self._identity = [*([extra_identity] if extra_identity else []),
                          {"adapter_config_sha256": hashlib.sha256(raw).hexdigest(), "applied_to": inner.source,
                           "inner": inner.identity()},
                          *weights.identity()]
        self._cached: tuple[str, torch.Tensor, torch.Tensor | None] | None = None

    # -- what the adapter is -----------------------------------------------------------------------

    def _check_config(self, config: dict) -> None:
        where = self.loc.where(CONFIG_NAME)
        kind = config.get("peft_type", "LORA")
        if str(kind).upper() != "LORA":
            raise DistSvcError(f"{where}: a {kind} adapter; dist-svc merges LoRA adapters only. Merge it into its "
                               f"base with PEFT (`merge_and_unload()`), save that, and merge the result.")
        if config.get("use_dora"):
            raise DistSvcError(f"{where}: a DoRA adapter (use_dora: true). DoRA rescales each column by a learned "
                               f"magnitude, so its change is not scale * B @ A and cannot be a LoRA task vector. "
                               f"Merge it into its base with PEFT (`merge_and_unload()`), save that, and merge the "
                               f"result as a full model.")
        for option in REFUSED_OPTIONS:
            if config.get(option) not in (None, False, {}, [], ""):
                raise DistSvcError(f"{where}: option {option} is set, which changes what the adapter computes and "
                                   f"dist-svc does not apply. Merge it into its base with PEFT (`merge_and_unload()`), "
                                   f"save that, and merge the result as a full model.")
        for option in ("r", "lora_alpha"):
            if not _positive(config.get(option)):
                raise DistSvcError(f"{where}: '{option}' is {quote(config.get(option))}, not a positive number.")

    def _scale(self, module: str, rank: int) -> float:
        r = _pattern_value(self._patterns["rank_pattern"], module, self.config["r"])
        alpha = _pattern_value(self._patterns["alpha_pattern"], module, self.config["lora_alpha"])
        if r != rank:
            raise DistSvcError(f"{self.loc}: module {quote(module)} has LoRA factors of rank {rank} but the config "
                               f"says r = {r}; the adapter is inconsistent. Re-save it.")
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def _map_keys(self, config: dict) -> None:
        """Every key of the adapter's weights to what it changes in the inner checkpoint; anything
        that fits nothing there is an adapter for another model."""
        keys = {key: _strip(key) for key in self.weights.tensors}
        modules: dict[str, dict[str, str]] = {}
        for key, name in keys.items():
            match = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?|"
                                 r"(.+)\.lora_B\.bias|(.+)\.(lora_magnitude_vector)(?:\.weight)?", name)
            if match and match.group(5):
                raise DistSvcError(f"{self.loc}: key {quote(key)} is a DoRA magnitude vector; DoRA adapters are not "
                                   f"LoRA task vectors (merge it with PEFT first).")
            if match and match.group(1):
                self._one_key(modules.setdefault(match.group(1), {}), match.group(2), key)
            elif match and match.group(3):
                self._one_key(modules.setdefault(match.group(3), {}), "bias", key)
            else:
                target = name[: -len(".base_layer.weight")] + ".weight" if name.endswith(".base_layer.weight") else name
                self._fits(key, target, self.weights.tensors[key].shape)
                self._one_key(self.full, target, key)
                if target != name:
                    self._base_layers.add(target)
        fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        for module, parts in sorted(modules.items()):
            embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
            a_key = parts.get("lora_embedding_A" if embedding else "lora_A")
            b_key = parts.get("lora_embedding_B" if embedding else "lora_B")
            if a_key is None or b_key is None:
                raise DistSvcError(f"{self.loc}: module {quote(module)} has only one of its LoRA factors "
                                   f"({', '.join(sorted(parts.values()))}); the adapter is incomplete. Re-save it.")
            a, b = self.weights.tensors[a_key].shape, self.weights.tensors[b_key].shape
            if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                raise DistSvcError(f"{self.loc}: module {quote(module)} has factors A {list(a)} and B {list(b)}, "
                                   f"which do not multiply (B @ A); the adapter is corrupt.")
            transpose = embedding or fan_in_fan_out
            shape = (a[1], b[0]) if transpose else (b[0], a[1])
            target = f"{module}.weight"
            self._fits(a_key, target, shape)
            scale = self._scale(module, a[0])
            self.factors[target] = Factors(a_key, b_key, scale, transpose)
            if "bias" in parts:
                bias = f"{module}.bias"
                self._fits(parts["bias"], bias, self.weights.tensors[parts["bias"]].shape)
                self.factors[bias] = Factors(None, parts["bias"], scale, False)

    def _one_key(self, keys: dict[str, str], part: str, key: str) -> None:
        """Records `key` as `part`, refusing a second key for the same part: two adapters saved in
        one file, or a prefixed and an unprefixed copy, and which one wins would be key order."""
        if part in keys:
            first, second = sorted((keys[part], key))
            raise DistSvcError(
                f"{self.weights.tensors[key].where}: keys {quote(first)} and {quote(second)} are both "
                f"{quote(_strip(key))}: the file holds two adapters (two adapter names, or a copy with and one "
                f"without the {PREFIX!r} prefix), and dist-svc will not pick one by key order. Save the adapter "
                f"alone (PEFT: save_pretrained with selected_adapters=[NAME]), or remove the other copy's keys.")
        keys[part] = key

    def _fits(self, key: str, target: str, shape: tuple[int, ...]) -> None:
        info = self.inner.tensors.get(target)
        if info is None:
            raise DistSvcError(
                f"{self.loc}: the adapter changes {quote(target)} (key {quote(key)}), which {self.inner.source} does "
                f"not have: the adapter was trained for another base model. Use it with the base it was made for.")
        if tuple(info.shape) != tuple(shape):
            raise DistSvcError(
                f"{self.loc}: the adapter's {quote(key)} makes {quote(target)} of shape {list(shape)}, but it is "
                f"{list(info.shape)} in {self.inner.source}: the adapter was trained for another base model. Use it "
                f"with the base it was made for.")

    # -- Checkpoint ----------------------------------------------------------------------------------

    def order(self) -> list[str]:
        return self.inner.order()

    def identity(self) -> list:
        return list(self._identity)

    def chunk_extent(self, name: str, axis: int) -> int:
        return self.inner.chunk_extent(name, axis)

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """The adapted tensor (or a block of it), rounded once to its stored dtype."""
        base = self.weights.read(self.full[name], rows, cols) if name in self.full else self.inner.read(name, rows, cols)
        change = self._change(name, rows, cols)
        if change is None:
            return base
        return (base.to(torch.float64) + change.reshape(base.shape)).to(base.dtype)

    def replaces(self, name: str) -> bool:
        """The adapter replaces the tensor whole: a `modules_to_save` tensor, or the base layer of
        an adapted embedding that PEFT saved with the adapter and that differs from the inner
        checkpoint's (a resized vocabulary); one PEFT saves unchanged replaces nothing (compared
        bit for bit once, when first asked)."""
        if name not in self.full:
            return False
        if name not in self._base_layers:
            return True
        if name not in self._same:
            saved, own = self.weights.read(self.full[name]), self.inner.read(name)
            self._same[name] = saved.dtype == own.dtype and torch.equal(saved, own)
        return not self._same[name]

    def delta(self, name: str, rows: slice | None, cols: slice | None, dtype: torch.dtype) -> torch.Tensor | None:
        """Exactly how the adapter changes the inner checkpoint's block (zeros where it changes
        nothing), computed in float64 and rounded once to `dtype`; None for a tensor the adapter
        replaces whole (its task vector is then read() - base)."""
        if self.replaces(name):
            return None
        change = self._change(name, rows, cols)
        if change is None:
            shape = _block_shape(self.inner.tensors[name].shape, rows, cols)
            return torch.zeros(shape, dtype=dtype)
        return change.to(dtype)

    def _change(self, name: str, rows: slice | None, cols: slice | None) -> torch.Tensor | None:
        """scale * (B @ A)[rows, cols] in float64, or None when the tensor is not adapted."""
        f = self.factors.get(name)
        if f is None:
            return None
        if f.a is None:  # a bias: scale * lora_B.bias
            return self.factor(f.b)[rows or slice(None)] * f.scale
        a, b = self._pair(f)
        rows, cols = rows or slice(None), cols or slice(None)
        if f.transpose:  # W = (B @ A)^T: W[rows, cols] = (B[cols] @ A[:, rows])^T
            return (b[cols] @ a[:, rows]).T * f.scale
        return (b[rows] @ a[:, cols]) * f.scale

    def _pair(self, f: Factors) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B of one module in float64, kept while blocks of the same tensor are read."""
        cached = self._cached  # one read: threads of one process share a checkpoint
        if cached is None or cached[0] != f.a:
            cached = self._cached = (f.a, self.factor(f.a), self.factor(f.b))
        return cached[1], cached[2]

    def factor(self, key: str) -> torch.Tensor:
        """One stored factor (A, B or a bias) in float64, refused if not finite."""
        t = self.weights.read(key).to(torch.float64)
        if not torch.isfinite(t).all():
            raise DistSvcError(f"{self.weights.tensors[key].where}: LoRA factor {quote(key)} contains NaN or Inf "
                               f"values; the adapter is broken. Re-train or re-download it.")
        return t

    def side_file(self, name: str) -> bytes | None:
        return self.inner.side_file(name)

    def checksum(self, name: str) -> str | None:
        return None

    def close(self) -> None:
        self._cached = None
        self.weights.close()
        self.inner.close()


def _strip(key: str) -> str:
    """An adapter key as the base model names the tensor: without PEFT's wrapper prefix and
    without an adapter name (`lora_A.default.weight` in adapters saved by hand)."""
    name = key.removeprefix(PREFIX)
    return re.sub(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|modules_to_save)\.[^.]+(\.weight|\.bias)$",
                  lambda m: f".{m.group(1)}{m.group(2)}", name).replace(".modules_to_save.weight", ".weight")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _patterns(field_value, field: str, where: str) -> list[tuple[list, float]]:
    """A `rank_pattern` / `alpha_pattern` mapping as (matcher, value) pairs, in the file's order
    (PEFT takes the first key that matches)."""
    if field_value is None:
        return []
    if not isinstance(field_value, dict):
        raise DistSvcError(f"{where}: '{field}' is a {type(field_value).__name__}, not a mapping from module-name "
                           f"patterns to numbers (as PEFT writes it: {{\"q_proj\": 16}}). Fix or remove it.")
    out = []
    for key, value in field_value.items():
        if not _positive(value):
            raise DistSvcError(f"{where}: '{field}' gives {quote(key)} the value {quote(value)}, not a positive "
                               f"number. Fix or remove that entry.")
        try:
            out.append((compile_key(key), value))
        except re.error as e:
            raise DistSvcError(f"{where}: '{field}' key {quote(key)} is not a valid regular expression ({e.msg}); "
                               f"PEFT matches each key as a regular expression against the end of a module's "
                               f"name. Fix the key.") from None
        except UnsupportedPattern as e:
            raise DistSvcError(f"{where}: '{field}' key {quote(key)} uses {e}, which dist-svc does not evaluate: it "
                               f"matches keys in time bounded by the module name's length, so backreferences, "
                               f"lookarounds, atomic groups, possessive repeats and scoped flags are refused. "
                               f"Write the key as the module's name or the end of it (e.g. "
                               f"'layers.0.self_attn.q_proj' or 'q_proj').") from None
    return out


def _pattern_value(patterns: list[tuple[list, float]], module: str, default: float) -> float:
    """PEFT's `get_pattern_key`: the value of the first key matching the end of the module's name."""
    return next((value for program, value in patterns if matches(program, module)), default)


def _block_shape(shape: tuple[int, ...], rows: slice | None, cols: slice | None) -> tuple[int, ...]:
    if not shape:
        return ()
    out = list(shape)
    if rows is not None:
        out[0] = len(range(*rows.indices(shape[0])))
    if cols is not None and len(shape) > 1:
        out[1] = len(range(*cols.indices(shape[1])))
    return tuple(out)
