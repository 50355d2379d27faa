"""Reading a config file: UTF-8 YAML, refused with one clear paragraph when it is not, repeats a
key, or costs more than a config can (its size, its nesting, how far its aliases expand), before
anything is built from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dist_svc.errors import DistSvcError
from dist_svc.methods.base import show

# What a config may cost before it is parsed: real configs are a few KB (a long evolved one with
# filters on every parameter, ~100 KB).
MAX_CONFIG_BYTES = 4 << 20
MAX_YAML_NODES = 200_000  # values after alias expansion
MAX_YAML_DEPTH = 64


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
