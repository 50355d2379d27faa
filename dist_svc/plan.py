"""The plan: every output tensor, what it is merged from and with what, from metadata alone.

An output tensor (a `Unit`) is merged from a group of inputs: one tensor of each model its
slice lists, the base among them where mergekit includes it. With `models:` every tensor of the
base (or of the first model) is merged from the same-named tensor of every model. With
`slices:` (frankenmerges, or whole-range slices) the output's layers are numbered anew, slice
after slice: output layer `o` of a slice with layer_range [a, b) reads layer `a + o - first` of
each source, under its own name; the tensors before the layers (embeddings) come from the
first slice's sources, those after (final norm, LM head) from the last slice's.

A tensor that is not a float (an integer or bool buffer: position ids, attention masks,
batch-norm counters) is not merged: its unit copies it byte for byte from the base (else from
the group's first model), as mergekit does. Models that lack it take that one's; models that
hold it must hold the same dtype, shape and values, which the plan checks (reading these
tensors, the only data it reads) before anything is written. One that only fine-tunes hold is
left out: the output has the base's tensors.

Parameters are resolved per tensor as mergekit does (gradients over the slice's layers,
filters on the tensor's name, a model's own setting, then the slice's, then the global one, then
the method's default) and carried by the unit; the manifest records them. Deterministic: the
same inputs and config give the same plan and the same fingerprint, which is how a rerun
recognises the merge it is resuming. Where each tensor's bytes go is the output layout's
business (dist_svc.storage.output).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

from dist_svc.calibration import should_calibrate
from dist_svc.config import MergeConfig, SliceSpec, SourceSpec
from dist_svc.errors import DistSvcError
from dist_svc.methods import Method
from dist_svc.resolution import layer_position, resolve, split_layer
from dist_svc.storage import open_checkpoint, read_blocks
from dist_svc.storage.hub import pins as hub_pins
from dist_svc.storage.output import side_files, source_files
from dist_svc.storage.types import (
    NAME_TO_ST, SIDE_FILES, ST_TO_NAME, Checkpoint, is_float, natural_key, tensor_nbytes,
)
from dist_svc.version import __version__

PLAN_FORMAT = 3
_PRE = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type")
MAX_LISTED = 5  # tensors named in one problem's message; the rest are counted


@dataclass(frozen=True)
class Source:
    """One input of a unit: a tensor of one checkpoint."""

    checkpoint: int  # index into the config's checkpoints
    tensor: str  # its name there


@dataclass(frozen=True)
class Unit:
    """One work unit: one output tensor, its inputs in mergekit's order, and the parameters it is
    merged with (resolved for this tensor)."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str  # safetensors code
    calibrate: bool
    params: dict[str, Any]  # the method's shared parameters
    inputs: tuple[Source, ...]
    base: int | None  # which of `inputs` is the base
    models: tuple[dict[str, Any], ...]  # each input's own parameters (the base's: only those of every input)
    needs: str  # "element", "row" or "tensor": how much of the tensor the method needs at once
    alpha: float | None = None  # calibration's alpha for this tensor
    vocabulary: bool = False  # axis 0 is the vocabulary, aligned token by token (dist_svc.vocab)
    chunks: tuple[int, int] = (1, 1)  # rows, columns per stored chunk of the inputs (zarr): blocks align to them
    copied: bool = False  # a non-float tensor: its only input's bytes, as stored (never merged or calibrated)
    # A run of several merges of the same inputs (dist_svc.batch): (target, that merge's unit)
    # for each target this unit feeds, read once for all; empty: the job's first target alone.
    variants: tuple[tuple[int, "Unit"], ...] = ()

    @property
    def nbytes(self) -> int:
        """The bytes the unit writes (for every target it feeds)."""
        if self.variants:
            return sum(u.nbytes for _, u in self.variants)
        return tensor_nbytes(self.out_dtype, self.shape)

    @property
    def fine_tunes(self) -> list[int]:
        """Positions in `inputs` of the non-base inputs."""
        return [i for i in range(len(self.inputs)) if i != self.base]

    def call_params(self, method: Method) -> dict[str, Any]:
        """What the method function receives: the shared parameters, and each per-model one as a
        tuple over the inputs it applies to (mergekit's PerInputValues)."""
        return _call_params(method, self.params, self.models, self.base)

    def merged_with(self) -> dict[str, Any]:
        """What the manifest records of the parameters and inputs."""
        return {"params": self.params,
                "inputs": [{"checkpoint": s.checkpoint, "tensor": s.tensor, **({"base": True} if i == self.base else {}),
                            **self.models[i]} for i, s in enumerate(self.inputs)],
                **({"alpha": self.alpha} if self.calibrate else {}),
                **({"copied": True} if self.copied else {})}


def _call_params(method: Method, params: dict, models: Sequence[dict], base: int | None) -> dict[str, Any]:
    out = dict(params)
    for p in method.model_params:
        which = range(len(models)) if p.scope == "input" else [i for i in range(len(models)) if i != base]
        out[p.name] = tuple(models[i][p.name] for i in which)
    return out


@dataclass(frozen=True)
class Plan:
    units: tuple[Unit, ...]
    inputs: dict  # checkpoint -> identity, for the fingerprint
    settings: dict  # what decides the bytes besides the inputs
    side_files: dict[str, bytes]  # config and tokenizer files, as the output gets them
    fingerprint: str

    def pins(self) -> dict[str, str]:
        """The commit every Hub model was resolved to: what workers must read."""
        return hub_pins(self.inputs)

    @property
    def total_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of every output tensor, in order: what an output layout needs."""
        return [(u.name, u.out_dtype, u.shape) for u in self.units]

    def summary(self) -> str:
        calibrated, copied = sum(u.calibrate for u in self.units), sum(u.copied for u in self.units)
        copies = f", {copied} non-float copied" if copied else ""
        return f"{len(self.units)} tensors ({calibrated} calibrated{copies}), {self.total_bytes / 2**30:.2f} GiB"


def open_inputs(config: MergeConfig, identity_only: bool = False,
                pins: dict[str, str] | None = None) -> tuple[Checkpoint, list[Checkpoint]]:
    """Every checkpoint of the merge, in the config's order (the base first when there is one),
    as (first, rest); each any checkpoint source (dist_svc.storage; mixing is fine): a LoRA
    adapter applies to the base. With `identity_only`, readers may skip what `identity()` and
    `side_file()` do not need. `pins`: the Hub commits the plan resolved (`Plan.pins`)."""
    opened: list[Checkpoint] = []
    try:
        for path in config.checkpoints:
            base = opened[0] if opened and config.base is not None else None
            opened.append(open_checkpoint(path, base=base, pins=pins, identity_only=identity_only))
    except BaseException:
        for c in opened:
            c.close()
        raise
    return opened[0], opened[1:]


# -- building the plan ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Group:
    """An output tensor before its parameters are resolved."""

    name: str
    sources: tuple[SourceSpec, ...]
    tensors: tuple[str, ...]  # each source's tensor name
    slice: SliceSpec
    t: float


def build_plan(config: MergeConfig, first: Checkpoint, rest: list[Checkpoint]) -> Plan:
    checkpoints = [first, *rest]
    _check_distinct(config, checkpoints)
    reference = config.base if config.base is not None else config.slices[0].sources[0].model
    files = side_file_reader(checkpoints)
    if not config.allow_crimes:
        _check_architectures(config, files)
    vocab = None
    if config.tokenizer is not None:
        from dist_svc.vocab import build_vocabulary

        vocab = build_vocabulary(config, files)
    problems: dict[str, list[str]] = {}  # message -> the tensors it concerns
    units = [unit for g in _groups(config, checkpoints, checkpoints[reference])
             if (unit := _unit(config, g, checkpoints, files, vocab, problems)) is not None]
    if problems:
        lines = [f"{message} (tensor{'s' if len(names) > 1 else ''} {', '.join(names[:MAX_LISTED])}"
                 f"{f' and {len(names) - MAX_LISTED} more' if len(names) > MAX_LISTED else ''})"
                 for message, names in problems.items()]
        raise DistSvcError(f"{config.source}: " + (lines[0] if len(lines) == 1 else
                                                   "\n  - ".join([f"{len(lines)} problems:", *lines])))

    inputs = input_identities(checkpoints)
    settings = plan_settings(config)
    out_files = _output_side_files(config, checkpoints[reference], files, reference, vocab)
    return Plan(tuple(units), inputs, settings, out_files, fingerprint(settings, inputs))


def input_identities(checkpoints: Sequence[Checkpoint]) -> dict:
    """What identifies the inputs: each checkpoint's identity and its side files' hashes."""
    return {c.source: {"tensors": c.identity(), "side_files": {
        name: hashlib.sha256(data).hexdigest() for name, data in source_files(c).items()}} for c in checkpoints}


def plan_settings(config: MergeConfig) -> dict:
    """What decides the bytes besides the inputs."""
    return {"config": config.fingerprint_dict()}


def fingerprint(settings: dict, inputs: dict) -> str:
    return hashlib.sha256(json.dumps(
        {"format": PLAN_FORMAT, "version": __version__, "settings": settings, "inputs": inputs},
        sort_keys=True).encode()).hexdigest()


def _unit(config: MergeConfig, g: "_Group", checkpoints: list[Checkpoint], files, vocab,
          problems: dict[str, list[str]]) -> Unit | None:
    """The unit of one output tensor, or None (and its problems noted) when its parameters do
    not resolve."""
    method, cal = config.method, config.calibration
    held = [(s, t) for s, t in zip(g.sources, g.tensors) if t in checkpoints[s.model].tensors]
    if not all(is_float(checkpoints[s.model].tensors[t].dtype) for s, t in held):
        return _copied(config, g.name, held, checkpoints)
    if len(held) < len(g.sources):
        s, t = next((s, t) for s, t in zip(g.sources, g.tensors) if t not in checkpoints[s.model].tensors)
        raise DistSvcError(f"{config.checkpoints[s.model]} has no tensor '{t}' ({s.field}): the sources of a slice "
                           f"must share their tensors.")
    inputs = tuple(Source(s.model, t) for s, t in zip(g.sources, g.tensors))
    base = next((i for i, s in enumerate(g.sources) if s.model == config.base), None)
    infos = [checkpoints[s.checkpoint].tensors[s.tensor] for s in inputs]
    vocabulary = vocab is not None and _is_vocabulary(g, infos, files)
    shape = _shape(g, infos, vocabulary, vocab)
    params, models = _resolve(method, g, base, config.parameters, problems)
    if params is None:
        return None
    message = method.check(_call_params(method, params, models, base)) if method.check else None
    if message:
        problems.setdefault(message, []).append(g.name)
        return None
    fine_tunes = len(inputs) - (base is not None)
    calibrate = (cal.enabled and base is not None and fine_tunes > 0 and should_calibrate(g.name, shape, cal.skip)
                 and (cal.target is None or cal.target < fine_tunes))
    out_dtype = NAME_TO_ST[config.out_dtype] if config.out_dtype else infos[base or 0].dtype  # else the base's
    chunks = tuple(max((checkpoints[s.checkpoint].chunk_extent(s.tensor, axis) for s in inputs), default=1)
                   if len(shape) > axis else 1 for axis in (0, 1))
    return Unit(g.name, shape, out_dtype, calibrate, params, inputs, base, models,
                "tensor" if vocabulary else method.granularity(params),
                cal.resolved_alpha(fine_tunes, method.alpha_is_one) if calibrate else None, vocabulary, chunks)


def _copied(config: MergeConfig, name: str, held: list[tuple[SourceSpec, str]], checkpoints: list[Checkpoint]) -> Unit:
    """The unit of a non-float output tensor: a copy of the base's (else the first model's), once
    every model that holds it is checked to hold the same (refused, naming it, if not)."""
    which = next((i for i, (s, _) in enumerate(held) if s.model == config.base), 0)
    source, tensor = held[which]
    first = checkpoints[source.model]
    info = first.tensors[tensor]
    for other, other_tensor in held:
        if other.model != source.model:
            _check_same_buffer(config, name, (source.model, first, tensor), (other.model, checkpoints[other.model],
                                                                            other_tensor))
    chunks = tuple(first.chunk_extent(tensor, axis) if len(info.shape) > axis else 1 for axis in (0, 1))
    return Unit(name, info.shape, info.dtype, False, {}, (Source(source.model, tensor),),
                0 if source.model == config.base else None, ({},), "element", chunks=chunks, copied=True)


def _check_same_buffer(config: MergeConfig, name: str, a: tuple[int, Checkpoint, str], b: tuple[int, Checkpoint, str]
                       ) -> None:
    """Two models hold the same non-float tensor: the same dtype, shape and bytes (compared
    block by block)."""
    (i, ca, ta), (j, cb, tb) = a, b
    ia, ib = ca.tensors[ta], cb.tensors[tb]
    if ia.dtype != ib.dtype:
        differ = f"its dtype ({ST_TO_NAME[ia.dtype]} and {ST_TO_NAME[ib.dtype]})"
    elif ia.shape != ib.shape:
        differ = f"its shape ({list(ia.shape)} and {list(ib.shape)})"
    else:
        differ, offset = None, 0
        for x, y in zip(read_blocks(ca, ta), read_blocks(cb, tb)):
            unequal = (x != y).reshape(-1).nonzero()
            if len(unequal):
                k = int(unequal[0])
                differ = (f"its values (element {offset + k} is {x.reshape(-1)[k].item()} and "
                          f"{y.reshape(-1)[k].item()})")
                break
            offset += x.numel()
        if differ is None:
            return
    role = lambda n: " (base_model)" if n == config.base else ""  # noqa: E731
    kind = "a bool" if "BOOL" in (ia.dtype, ib.dtype) else "an integer"
    giver = "base" if config.base is not None else "first model"
    raise DistSvcError(
        f"{config.source}: the models disagree on tensor '{name}', {kind} tensor, which is copied rather than "
        f"merged: {config.checkpoints[i]}{role(i)} and {config.checkpoints[j]}{role(j)} differ in {differ}. dist-svc "
        f"copies such a tensor from the {giver}, as mergekit does, only when every model that holds it holds the "
        f"same one. Make them equal, or remove it from the models that should take the {giver}'s; nothing was "
        f"written.")


def _check_distinct(config: MergeConfig, checkpoints: list[Checkpoint]) -> None:
    """Two spellings of one checkpoint (a directory and its model.safetensors, a symlink) would
    be merged as two models: refused, naming both."""
    seen: dict[frozenset, int] = {}
    for i, c in enumerate(checkpoints):
        key = _stored_files(c)
        if key in seen:
            j = seen[key]
            role = lambda n: "base_model" if n == config.base else "a model"  # noqa: E731
            raise DistSvcError(
                f"{config.source}: {config.checkpoints[j]} ({role(j)}) and {config.checkpoints[i]} ({role(i)}) are the "
                f"same checkpoint (the same files); it would count twice. Write it the same way everywhere "
                f"(mergekit leaves the base out of the models when it is written as base_model is), or list it once.")
        seen[key] = i


def _stored_files(checkpoint: Checkpoint) -> frozenset:
    """What identifies the files a checkpoint reads, however they were named: (device, inode)
    of each (of a safetensors checkpoint's files, of a zarr store's directory)."""
    import os

    files = getattr(checkpoint, "files", None) or [getattr(checkpoint, "path", None)]
    keys = set()
    for file in files:
        path = file if isinstance(file, (str, os.PathLike)) else getattr(file, "path", None)  # a LocalFile's Path
        if path is not None and os.path.exists(path):
            st = os.stat(path)
            keys.add((st.st_dev, st.st_ino))
        else:  # on object storage, or not a file of its own (an adapter): its name
            keys.add(str(getattr(file, "where", None) or checkpoint.source))
    return frozenset(keys)


def _groups(config: MergeConfig, checkpoints: list[Checkpoint], ref: Checkpoint) -> list[_Group]:
    if config.whole_models:
        return _whole_model_groups(config, checkpoints, ref)
    return _slice_groups(config, checkpoints)


def _whole_model_groups(config: MergeConfig, checkpoints: list[Checkpoint], ref: Checkpoint) -> list[_Group]:
    """`models:`: every tensor of the reference (the base, else the first model), from every
    model under the same name; every model must hold exactly the reference's tensors."""
    (sl,) = config.slices
    for s in sl.sources:
        _check_same_tensors(ref, checkpoints[s.model])
    order = ref.order()
    layers = [i for i in (split_layer(n) for n in order) if i is not None]
    num_layers = max(i[1] for i in layers) + 1 if layers else 0
    return [_Group(n, sl.sources, tuple(n for _ in sl.sources), sl, layer_position(n, num_layers)) for n in order]


def _check_same_tensors(ref: Checkpoint, model: Checkpoint) -> None:
    """A model holds the reference's tensors and no others, but for non-float ones: one it
    lacks, it takes from the reference; one only it holds, the output (the reference's
    tensors) leaves out."""
    if model is ref:
        return
    for name, info in ref.tensors.items():
        if name not in model.tensors and is_float(info.dtype):
            raise DistSvcError(f"tensor '{name}' of {ref.source} is missing from {model.source}; "
                               f"every model must have the base's tensors.")
    extra = sorted((n for n in set(model.tensors) - set(ref.tensors) if is_float(model.tensors[n].dtype)),
                   key=natural_key)
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise DistSvcError(f"{model.source} has tensor '{extra[0]}'{more} that the base ({ref.source}) lacks; "
                           f"a fine-tune must have the base's tensors and no others.")


def _slice_groups(config: MergeConfig, checkpoints: list[Checkpoint]) -> list[_Group]:
    """`slices:`: the first slice's tensors before the layers, every slice's layers renumbered
    in order, the last slice's tensors after the layers."""
    first, last = config.slices[0], config.slices[-1]
    lead = checkpoints[first.sources[0].model]
    outside = [n for n in lead.order() if split_layer(n) is None]
    pre = [n for n in outside if any(p in n for p in _PRE)]
    tail_ref = checkpoints[last.sources[0].model]
    post = [n for n in tail_ref.order() if split_layer(n) is None and not any(p in n for p in _PRE)]
    groups = [_Group(n, first.sources, tuple(n for _ in first.sources), first, 0.0) for n in pre]
    out_layer = 0
    for sl in config.slices:
        length = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        layered = [_layers(checkpoints[s.model], s, config.checkpoints[s.model]) for s in sl.sources]
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            prefix_suffixes = layered[0][sl.sources[0].layer_range[0] + offset]
            lead = checkpoints[sl.sources[0].model]
            for prefix, suffix in prefix_suffixes:
                buffer = not is_float(lead.tensors[f"{prefix}{sl.sources[0].layer_range[0] + offset}{suffix}"].dtype)
                names = tuple(_layer_name(layered[j], s.layer_range[0] + offset, prefix, suffix, config, s, buffer)
                              for j, s in enumerate(sl.sources))
                groups.append(_Group(f"{prefix}{out_layer}{suffix}", sl.sources, names, sl, t))
            out_layer += 1
    groups += [_Group(n, last.sources, tuple(n for _ in last.sources), last, 0.0) for n in post]
    return groups


def _layers(checkpoint: Checkpoint, source: SourceSpec, path) -> dict[int, list[tuple[str, str]]]:
    """layer index -> its tensors' (prefix, suffix), in the checkpoint's order."""
    out: dict[int, list[tuple[str, str]]] = {}
    for name in checkpoint.order():
        split = split_layer(name)
        if split is not None:
            out.setdefault(split[1], []).append((split[0], split[2]))
    start, stop = source.layer_range
    if stop > len(out) or any(i not in out for i in range(start, stop)):
        raise DistSvcError(f"{source.field}.layer_range [{start}, {stop}] reads layers {start}..{stop - 1} of "
                           f"{path}, which has {len(out)} layers (0..{len(out) - 1}).")
    return out


def _layer_name(layers, index: int, prefix: str, suffix: str, config: MergeConfig, source: SourceSpec,
                buffer: bool) -> str:
    """The tensor of a source's layer; a non-float one (`buffer`) may be missing (the unit copies
    another source's)."""
    if (prefix, suffix) not in layers[index] and not buffer:
        raise DistSvcError(f"{config.checkpoints[source.model]} has no tensor '{prefix}{index}{suffix}' "
                           f"({source.field}): the sources of a slice must share their layers' tensors.")
    return f"{prefix}{index}{suffix}"


def _shape(g: _Group, infos, vocabulary: bool, vocab) -> tuple[int, ...]:
    shape = infos[0].shape
    for info in infos[1:]:
        if (info.shape[1:] == shape[1:]) if vocabulary else (info.shape == shape):
            continue
        from dist_svc.vocab import is_vocabulary_tensor

        rows_differ = len(info.shape) == len(shape) and info.shape[1:] == shape[1:]
        hint = (" The vocabularies differ: set `tokenizer_source: union` (or base) to merge embeddings token by token."
                if rows_differ and is_vocabulary_tensor(info.name, info.shape, info.shape[0], False)
                else " Models must share the base's architecture.")
        raise DistSvcError(f"tensor '{info.name}' has shape {list(info.shape)} in {info.where} but {list(shape)} "
                           f"in {infos[0].where}.{hint}")
    return (vocab.size, *shape[1:]) if vocabulary else shape


def _is_vocabulary(g: _Group, infos, files) -> bool:
    from dist_svc.vocab import config_vocab_size, is_vocabulary_tensor

    return all(is_vocabulary_tensor(name, info.shape, config_vocab_size(files(src.model).get("config.json")),
                                    split_layer(name) is not None)
               for src, name, info in zip(g.sources, g.tensors, infos))


def _resolve(method, g: _Group, base: int | None, global_params, problems) -> tuple[dict | None, tuple]:
    """mergekit's resolve_parameters: shared parameters from the slice's settings, then the
    global ones, at the output tensor's name; each input's from its own settings, then the
    slice's, then the global ones, at its own tensor's name; then the default."""
    ok = True
    params = {}
    for p in method.shared_params:
        value = _first(p, [g.slice.parameters, global_params], g.name, g.t)
        if value is _MISSING:
            problems.setdefault(f"{method.name} needs '{p.name}' (set it under `parameters:`)", []).append(g.name)
            ok = False
        elif isinstance(value, ValueError):
            problems.setdefault(f"'{p.name}' {value}", []).append(g.name)
            ok = False
        else:
            params[p.name] = value
    models = []
    for i, (source, tensor) in enumerate(zip(g.sources, g.tensors)):
        own = {}
        for p in method.model_params:
            if i == base and p.scope == "model":
                continue
            value = _first(p, [source.parameters, g.slice.parameters, global_params], tensor, g.t)
            if value is _MISSING:
                problems.setdefault(f"{method.name} needs '{p.name}' for {source.field} (set it there or under "
                                    f"`parameters:`)", []).append(g.name)
                ok = False
            elif isinstance(value, ValueError):
                problems.setdefault(f"'{p.name}' of {source.field} {value}", []).append(g.name)
                ok = False
            else:
                own[p.name] = value
        models.append(own)
    return (params if ok else None), tuple(models)


_MISSING = object()


def _first(param, scopes: Sequence, tensor: str, t: float):
    for scope in scopes:
        if param.name in scope:
            value = resolve(scope[param.name], tensor, t)
            if value is not None:
                try:
                    return param.check(value)
                except ValueError as e:
                    return e
    return _MISSING if param.required else param.default


# -- side files ----------------------------------------------------------------------------------------

def side_file_reader(checkpoints: list[Checkpoint]):
    """checkpoint index -> its side files by name (read once)."""
    cache: dict[int, dict[str, bytes | None]] = {}

    def files(i: int) -> dict[str, bytes | None]:
        if i not in cache:
            cache[i] = {name: checkpoints[i].side_file(name) for name in SIDE_FILES}
        return cache[i]

    return files


def _check_architectures(config: MergeConfig, files) -> None:
    """mergekit refuses to merge models of different architectures without --allow-crimes."""
    seen = {}
    for i, path in enumerate(config.checkpoints):
        raw = files(i).get("config.json")
        try:
            arch = tuple(json.loads(raw).get("architectures") or ()) if raw else ()
        except (ValueError, AttributeError):
            arch = ()
        if arch:
            seen.setdefault(arch, path)
    if len(seen) > 1:
        (a, pa), (b, pb) = list(seen.items())[:2]
        raise DistSvcError(f"{config.source}: the models are of different architectures ({'/'.join(a)} in {pa}, "
                           f"{'/'.join(b)} in {pb}); mergekit refuses that too unless --allow-crimes is given. "
                           f"Pass --allow-crimes to merge them anyway.")


def _output_side_files(config: MergeConfig, ref: Checkpoint, files, reference: int, vocab) -> dict[str, bytes]:
    """The reference's config and tokenizer files as the output gets them: config.json with the
    output dtype, layer count and vocabulary size; the tokenizer as built (or copied, or left out
    with --no-copy-tokenizer), with the chat template asked for."""
    from dist_svc.vocab import (
        TOKENIZER_FILES, chat_template_of, chat_template_text, patched_config, source_files_of, tokenizer_files,
        with_chat_template,
    )

    out = side_files(ref, config.out_dtype)
    changes: dict[str, Any] = {}
    if not config.whole_models:
        changes["num_hidden_layers"] = sum(sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
                                           for sl in config.slices)
    if vocab is not None:
        changes["vocab_size"] = vocab.size
        donor = files(reference) if config.tokenizer.source in ("base", "union") else \
            source_files_of(config.tokenizer.source, [str(p) for p in config.checkpoints], files)
        tokenizer = tokenizer_files(vocab, donor)
    elif config.copy_tokenizer:
        tokenizer = {name: data for name, data in out.items() if name in TOKENIZER_FILES}
    else:
        tokenizer = {}
    out = {name: data for name, data in out.items() if name not in TOKENIZER_FILES}
    if changes and "config.json" in out:
        out["config.json"] = patched_config(out["config.json"], changes)
    if config.chat_template is not None and tokenizer:
        template = chat_template_text(config.chat_template,
                                      [chat_template_of(files(i)) for i in range(len(config.checkpoints))])
        if template is not None:
            tokenizer = with_chat_template(tokenizer, template)
    return {**out, **tokenizer}
