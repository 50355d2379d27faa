"""Tokenizers and vocabularies as mergekit 0.1.5 builds them (`tokenizer_source:`, `tokenizer:`,
`chat_template:`), from the checkpoints' tokenizer files alone (no transformers needed).

With a tokenizer setting, the output vocabulary is the base's (`base`), the base's plus every
token another model adds (`union`), or a given model's, plus `tokenizer.tokens`. Every tensor
indexed by the vocabulary (embeddings, LM heads) is then aligned token by token before the
merge: each input's row for a token is its own row for that token when it has one; otherwise
the token's default row, which is (mergekit's rule) the one model's row when a single model
has the token, the base's when the base has it, else the mean of the models that have it, else
zeros; `tokenizer.tokens` may name another source or force one. The output's tokenizer files
are written to match the rows, and config.json's vocab_size with them.

Where mergekit's result depends on Python's set order or a hash map's (which model's new tokens
get the lower ids when several models add tokens), dist-svc takes the config's order: the base
first, then the models as listed. docs/methods.md.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from dist_svc.config import MergeConfig, TokenizerSpec
from dist_svc.errors import DistSvcError
from dist_svc.storage.types import TOKENIZER_FILES

# Tensors indexed by the vocabulary along axis 0 (besides having the vocabulary's length there).
_VOCAB_NAMES = ("embed", "wte", "lm_head", "word_embeddings", "shared.weight", "cls.predictions", "output.weight")

SideFiles = Callable[[int], Mapping[str, bytes | None]]  # checkpoint index -> its files by name


def is_vocabulary_tensor(name: str, shape: Sequence[int], vocab_size: int | None, in_layer: bool) -> bool:
    return (not in_layer and vocab_size is not None and len(shape) in (1, 2) and shape[0] == vocab_size
            and any(p in name for p in _VOCAB_NAMES))


def config_vocab_size(config_bytes: bytes | None) -> int | None:
    """`vocab_size` of a checkpoint's config.json (of its text model, for multimodal ones)."""
    if config_bytes is None:
        return None
    try:
        config = json.loads(config_bytes)
    except ValueError:
        return None
    if not isinstance(config, dict):
        return None
    size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return size if isinstance(size, int) and not isinstance(size, bool) else None


# -- one tokenizer, as tokenizer.json describes it ----------------------------------------------------

@dataclass
class Tokenizer:
    data: dict  # tokenizer.json
    where: str

    @classmethod
    def read(cls, files: Mapping[str, bytes | None], where: str) -> "Tokenizer":
        raw = files.get("tokenizer.json")
        if raw is None:
            raise DistSvcError(f"{where} has no tokenizer.json; merging vocabularies (tokenizer_source, tokenizer) "
                               f"reads fast tokenizers' tokenizer.json. Save the tokenizer with transformers first.")
        try:
            data = json.loads(raw)
            _ = data["model"]
        except (ValueError, KeyError, TypeError):
            raise DistSvcError(f"{where}/tokenizer.json is not a tokenizer (expected JSON with a 'model').") from None
        tokenizer = cls(data, where)
        tokenizer.vocab()  # refuses what it cannot read
        return tokenizer

    @property
    def model_type(self) -> str:
        return self.data["model"].get("type", "?")

    def model_vocab(self) -> dict[str, int]:
        vocab = self.data["model"].get("vocab")
        if self.model_type == "Unigram" and isinstance(vocab, list):
            return {entry[0]: i for i, entry in enumerate(vocab)}
        if isinstance(vocab, dict):
            return dict(vocab)
        raise DistSvcError(f"{self.where}/tokenizer.json: a {self.model_type} model whose vocabulary dist-svc "
                           f"cannot read.")

    def added(self) -> list[dict]:
        return sorted(self.data.get("added_tokens") or [], key=lambda a: a["id"])

    def vocab(self) -> dict[str, int]:
        """transformers' get_vocab(): the model's vocabulary with the added tokens."""
        vocab = self.model_vocab()
        for entry in self.added():
            vocab[entry["content"]] = entry["id"]
        return vocab

    def stripped(self, size: int | None) -> "Tokenizer":
        """Without the tokens whose id is not a row of the model (mergekit's get_stripped_tokenizer)."""
        if size is None or all(i < size for i in self.vocab().values()):
            return self
        data = json.loads(json.dumps(self.data))
        gone = {t for t, i in self.vocab().items() if i >= size}
        data["added_tokens"] = [a for a in data.get("added_tokens") or [] if a["id"] < size]
        model = data["model"]
        if isinstance(model.get("vocab"), dict):
            model["vocab"] = {t: i for t, i in model["vocab"].items() if i < size}
        else:
            raise DistSvcError(f"{self.where}: its tokenizer has tokens beyond the model's {size} rows and is a "
                               f"{self.model_type} model, which mergekit cannot strip either.")
        if isinstance(model.get("merges"), list):
            model["merges"] = [m for m in model["merges"]
                               if not set(m.split(" ") if isinstance(m, str) else m) & gone]
        return Tokenizer(data, self.where)

    def add(self, content: str, entry: dict | None = None) -> None:
        """transformers' add_tokens: an added token; an existing added token is left as it is, a
        model token keeps its id, a new one gets the next id."""
        added = self.data.setdefault("added_tokens", [])
        if any(a["content"] == content for a in added):
            return
        model_vocab = self.model_vocab()
        if content in model_vocab:
            new_id = model_vocab[content]
        else:
            top = max((a["id"] for a in added), default=-1)
            new_id = max(len(model_vocab), top + 1)
        info = {"id": new_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": True, "special": False}
        if entry is not None:
            info.update({k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in entry})
        added.append(info)
        added.sort(key=lambda a: a["id"])

    def to_bytes(self) -> bytes:
        return (json.dumps(self.data, indent=2, ensure_ascii=False) + "\n").encode()


# -- the output vocabulary ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RowSource:
    """Where a token's default row comes from, in one tensor's inputs."""

    kind: str  # "model": the token's row in that checkpoint; "model_token": another token's; "zero"
    checkpoint: int | None = None
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class Vocabulary:
    """The output vocabulary and, for every checkpoint, where each output token's row is in it."""

    tokens: dict[str, int]  # output token -> id
    size: int  # rows of the output's vocabulary tensors (padded to pad_to_multiple_of)
    rows: dict[int, list[int]]  # checkpoint -> for each output id, the row there, or -1
    vocabs: dict[int, dict[str, int]]  # checkpoint -> its own vocabulary (model_token sources by name)
    base: int | None  # the base's checkpoint index
    configs: dict[str, tuple[RowSource, bool]]  # token -> its configured source and force
    tokenizer: Tokenizer  # the output's


def build_vocabulary(config: MergeConfig, files: SideFiles) -> Vocabulary:
    spec: TokenizerSpec = config.tokenizer
    paths = [str(p) for p in config.checkpoints]
    donor = config.base if config.base is not None else 0
    sizes = {i: config_vocab_size(files(i).get("config.json")) for i in range(len(paths))}
    for i, path in enumerate(paths):
        if sizes[i] is None:
            raise DistSvcError(f"{path}/config.json has no vocab_size; merging vocabularies needs each model's.")
    tokenizers: dict[int, Tokenizer] = {donor: Tokenizer.read(files(donor), paths[donor]).stripped(sizes[donor])}
    for i, path in enumerate(paths):
        if i != donor:  # a model without a tokenizer has the donor's (mergekit assumes so too)
            own = files(i).get("tokenizer.json") is not None
            tokenizers[i] = Tokenizer.read(files(i), path) if own else tokenizers[donor]

    if spec.source == "base":
        out = Tokenizer(json.loads(json.dumps(tokenizers[donor].data)), paths[donor])
    elif spec.source == "union":
        out = _union(tokenizers, sizes, [donor] + [i for i in range(len(paths)) if i != donor], paths[donor])
    else:
        out = Tokenizer.read(source_files_of(spec.source, paths, files), spec.source)
    for token, _, _ in spec.tokens:
        if token not in out.vocab():  # a token it has stays as it is (mergekit's rule): not an added token
            out.add(token)

    tokens = out.vocab()
    if sorted(tokens.values()) != list(range(len(tokens))):
        raise DistSvcError(f"{out.where}: the output tokenizer's ids are not 0..{len(tokens) - 1} without gaps; "
                           f"its rows cannot be laid out (mergekit fails on it too).")
    size = len(tokens)
    if spec.pad_to_multiple_of and size % spec.pad_to_multiple_of:
        size += spec.pad_to_multiple_of - size % spec.pad_to_multiple_of
    rows = {}
    for i in range(len(paths)):
        own = tokenizers[i].vocab()
        rows[i] = [-1] * len(tokens)
        for token, new_id in tokens.items():
            old = own.get(token)
            if old is not None and old < sizes[i]:
                rows[i][new_id] = old
    configs = {}
    for token, source, force in spec.tokens:
        if source.kind == "default":
            continue  # mergekit's rule, as for any other token
        if source.model is not None and source.model not in paths:
            raise DistSvcError(f"{config.source}: tokenizer.tokens.{token} takes its embedding from {source.model}, "
                               f"which the merge does not read; name one of its models.")
        checkpoint = None if source.model is None else paths.index(source.model)
        configs[token] = (RowSource(source.kind, checkpoint, source.token, source.token_id), force)
    return Vocabulary(tokens, size, rows, {i: t.vocab() for i, t in tokenizers.items()}, config.base, configs, out)


def source_files_of(path: str, paths: list[str], files: SideFiles) -> Mapping[str, bytes | None]:
    """The tokenizer files of `path`: a checkpoint of the merge's, else a directory read directly."""
    if path in paths:
        return files(paths.index(path))
    from pathlib import Path

    return {name: (Path(path) / name).read_bytes() if (Path(path) / name).is_file() else None
            for name in TOKENIZER_FILES}


def _union(tokenizers: dict[int, Tokenizer], sizes: dict[int, int], order: list[int], where: str) -> Tokenizer:
    """mergekit's build_union_tokenizer: the base's tokenizer, plus each model's tokens it lacks
    (as plain added tokens), plus every model's added tokens with their settings."""
    plain: dict[str, None] = {}
    added: dict[str, dict] = {}
    for i in order:
        tokenizer = tokenizers[i]
        for token, idx in sorted(tokenizer.vocab().items(), key=lambda kv: kv[1]):
            if idx < sizes[i]:
                plain.setdefault(token)
        for entry in tokenizer.added():
            if entry["id"] < sizes[i]:
                added.setdefault(entry["content"], entry)
    base = tokenizers[order[0]]
    out = Tokenizer(json.loads(json.dumps(base.data)), where)
    base_vocab = base.vocab()
    for token in plain:
        if token not in added and token not in base_vocab:
            out.add(token)
    for token, entry in added.items():
        out.add(token, entry)
    return out


def align(vocab: Vocabulary, tensors: list[torch.Tensor], checkpoints: list[int]) -> list[torch.Tensor]:
    """mergekit's PermutedVocabulary for one tensor: each input's rows in the output
    vocabulary's order (tensors in the compute dtype, vocabulary along axis 0; `checkpoints`:
    each input's checkpoint)."""
    n = len(vocab.tokens)
    names = {tid: token for token, tid in vocab.tokens.items()}
    perms = torch.tensor([vocab.rows[c] for c in checkpoints], dtype=torch.int64)  # inputs x tokens
    forced = {vocab.tokens[t] for t, (_, force) in vocab.configs.items() if force and t in vocab.tokens}
    special = sorted(set(torch.nonzero((perms < 0).any(dim=0)).flatten().tolist()) | forced)
    defaults: dict[int, torch.Tensor] = {}
    for tid in special:
        token = names[tid]
        has = (perms[:, tid] >= 0).tolist()
        if token in vocab.configs:
            defaults[tid] = _default_row(vocab.configs[token][0], token, tid, tensors, checkpoints, perms, vocab)
        elif sum(has) == 1:
            j = has.index(True)
            defaults[tid] = tensors[j][int(perms[j, tid])]
        elif not any(has):
            defaults[tid] = tensors[0].new_zeros(tensors[0].shape[1:])
        elif vocab.base in checkpoints and has[checkpoints.index(vocab.base)]:
            j = checkpoints.index(vocab.base)
            defaults[tid] = tensors[j][int(perms[j, tid])]
        else:  # the mean of the models that have it
            embed = torch.zeros(tensors[0].shape[1:], dtype=tensors[0].dtype, device=tensors[0].device)
            for j, present in enumerate(has):
                if present:
                    embed = embed + tensors[j][int(perms[j, tid])]
            defaults[tid] = embed / sum(has)
    out = []
    for j, tensor in enumerate(tensors):
        rows = perms[j].clone()
        rows[list(forced)] = -1
        keep = torch.nonzero(rows >= 0).flatten()
        new = torch.zeros((vocab.size, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        new[keep.to(tensor.device)] = tensor[rows[keep].to(tensor.device)]
        for tid, row in defaults.items():
            if rows[tid] < 0:
                new[tid] = row
        if vocab.size > n:  # padding rows: the mean row (as mergekit)
            new[n:] = new[:n].mean(dim=0)
        out.append(new)
    return out


def _default_row(source: RowSource, token: str, tid: int, tensors, checkpoints, perms, vocab: Vocabulary):
    if source.kind == "zero":
        return tensors[0].new_zeros(tensors[0].shape[1:])
    if source.checkpoint not in checkpoints:
        raise DistSvcError(f"token {token!r} takes its row from a model this tensor's inputs do not include "
                           f"(tokenizer.tokens); name one of them.")
    j = checkpoints.index(source.checkpoint)
    if source.kind == "model_token":
        row = source.token_id if source.token_id is not None else vocab.vocabs[source.checkpoint].get(source.token)
        if row is None or not 0 <= row < tensors[j].shape[0]:
            raise DistSvcError(f"token {token!r}: its source token {source.token or source.token_id!r} is not a row "
                               f"of the model tokenizer.tokens names.")
        return tensors[j][row]
    if perms[j, tid] < 0:
        raise DistSvcError(f"token {token!r} is not in the model tokenizer.tokens names as its source.")
    return tensors[j][int(perms[j, tid])]


# -- the output's files ---------------------------------------------------------------------------------

def tokenizer_files(vocab: Vocabulary, donor_files: Mapping[str, bytes | None]) -> dict[str, bytes]:
    """The output's tokenizer files: tokenizer.json with the output vocabulary; the rest of the
    tokenizer's files as the donor (the base, or the tokenizer source) has them, added_tokens.json
    (stale once tokens change) left out."""
    out = {name: data for name in TOKENIZER_FILES if (data := donor_files.get(name)) is not None}
    out.pop("added_tokens.json", None)
    out["tokenizer.json"] = vocab.tokenizer.to_bytes()
    return out


def chat_template_text(spec: str, templates: Sequence[str | None]) -> str | None:
    """mergekit's `chat_template`: a template's name, auto (the most common template among the
    models', first listed on a tie; None when no model has one) or the template itself. A name is
    one of mergekit's own templates, read from the installed mergekit (its text is mergekit's,
    under mergekit's licence; dist-svc does not ship a copy)."""
    from dist_svc.config import CHAT_TEMPLATE_NAMES

    if spec == "auto":
        found = [t.strip() for t in templates if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if spec not in CHAT_TEMPLATE_NAMES:
        return spec
    try:
        from importlib.resources import files

        return (files("mergekit._data.chat_templates") / f"{spec}.jinja").read_text()
    except (ImportError, OSError):
        raise DistSvcError(f"chat_template: {spec} names one of mergekit's templates, which dist-svc reads from an "
                           f"installed mergekit (pip install mergekit) instead of shipping a copy. Install it, or "
                           f"write the Jinja template itself in the config.") from None


def chat_template_of(files: Mapping[str, bytes | None]) -> str | None:
    """A checkpoint's chat template: chat_template.jinja, else tokenizer_config.json's."""
    if files.get("chat_template.jinja") is not None:
        return files["chat_template.jinja"].decode("utf-8", "replace")
    raw = files.get("tokenizer_config.json")
    try:
        template = json.loads(raw).get("chat_template") if raw is not None else None
    except (ValueError, AttributeError):
        return None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def with_chat_template(files: dict[str, bytes], template: str) -> dict[str, bytes]:
    """The tokenizer files with `template` as their chat template: chat_template.jinja (which
    transformers reads before tokenizer_config.json's), the older places cleared."""
    out = dict(files)
    out["chat_template.jinja"] = template.encode()
    out.pop("chat_template.json", None)
    if "tokenizer_config.json" in out:
        try:
            config = json.loads(out["tokenizer_config.json"])
        except ValueError:
            config = None
        if isinstance(config, dict) and "chat_template" in config:
            del config["chat_template"]
            out["tokenizer_config.json"] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
    return out


def patched_config(config_bytes: bytes, changes: Mapping[str, Any]) -> bytes:
    """config.json with some keys set (num_hidden_layers of a frankenmerge, vocab_size)."""
    try:
        config = json.loads(config_bytes)
    except ValueError:
        return config_bytes
    if not isinstance(config, dict):
        return config_bytes
    config.update(changes)
    return (json.dumps(config, indent=2) + "\n").encode()
