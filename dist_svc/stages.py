"""Several merges in one file (mergekit-multimerge's stages): YAML documents, each a merge config
with a `name`, whose outputs later documents use as models by that name.

The final model is the document without a `name` (at most one), else the last document; it goes
to OUT_DIR. Every named stage goes to INTERMEDIATE_DIR/NAME (default: OUT_DIR's sibling
`OUT_DIR.stages`). Stages run in the order their dependencies need (the file's order where
they are free), each one a merge of its own with its own manifest: rerunning the command skips
finished stages and resumes the interrupted one, stage by stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from dist_svc.config import MergeConfig, parse_config, read_documents
from dist_svc.errors import DistSvcError
from dist_svc.methods.base import show
from dist_svc.storage.durable import local_path


@dataclass(frozen=True)
class Stage:
    name: str | None
    config: MergeConfig
    out_dir: Path | str  # a local directory, or an s3:// URL
    needs: tuple[str, ...]  # stages whose outputs it reads


def _place(path: str | Path, what: str) -> Path | str:
    """A local path made absolute, or a URL (object storage) as it is."""
    from dist_svc.storage.location import is_url

    return str(path).rstrip("/") if is_url(str(path)) else local_path(path, what)


def _within(folder: Path | str, name: str) -> Path | str:
    return folder / name if isinstance(folder, Path) else f"{folder}/{name}"


NAME_BYTES = 255  # the longest file name most filesystems (and S3 keys' segments, in practice) take


def _name_problem(name: Any) -> str | None:
    """Why `name` cannot be a stage's directory name, or None."""
    if not isinstance(name, str):
        return f"expected a string (got {show(name)})"
    if not name.strip():
        return "it is empty"
    if name in (".", ".."):
        return f"{name!r} names a directory that already exists (the stages' folder or its parent)"
    if "/" in name or "\\" in name:
        return f"{show(name)} contains a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return f"{show(name)} contains a control character (NUL, newline, ...)"
    if len(name.encode()) > NAME_BYTES:
        return f"it is {len(name.encode())} bytes long, more than a file name may be ({NAME_BYTES})"
    return None


def default_intermediate_dir(out_dir: str | Path) -> Path | str:
    out_dir = _place(out_dir, "OUT_DIR")
    if isinstance(out_dir, str):
        return f"{out_dir}.stages"
    return out_dir.parent / f"{out_dir.name}.stages"


def load_stages(path: str | Path, out_dir: str | Path, intermediate_dir: str | Path | None = None,
                calibrate: bool | None = None) -> list[Stage]:
    """The stages of a config file, in the order they run (one stage for a one-document file)."""
    documents = read_documents(path)
    out_dir = _place(out_dir, "OUT_DIR")
    intermediate = _place(intermediate_dir, "INTERMEDIATE_DIR") if intermediate_dir else \
        default_intermediate_dir(out_dir)
    names: list[str | None] = []
    for i, doc in enumerate(documents):
        name = doc.get("name") if isinstance(doc, dict) else None
        problem = None if name is None else _name_problem(name)
        if problem:
            raise DistSvcError(f"{path}: document {i + 1}: field 'name': {problem}; a stage's name is the name of "
                               f"its output directory, so it must be a plain file name. Nothing was written.")
        if name is not None and name in names:
            raise DistSvcError(f"{path}: two stages are named {name!r}; give each its own name.")
        names.append(name)
    if names.count(None) > 1:
        raise DistSvcError(f"{path}: {names.count(None)} documents have no `name`; only the final merge may go "
                           f"without one (as mergekit-multimerge requires).")
    final = names.index(None) if None in names else len(documents) - 1
    outputs = {name: (out_dir if i == final else _within(intermediate, name)) for i, name in enumerate(names)
               if name is not None}
    stages = []
    for i, (doc, name) in enumerate(zip(documents, names)):
        used: set[str] = set()
        doc = _substituted(doc, {n: str(p) for n, p in outputs.items() if n != name}, used)
        where = f"{path}" + (f" (stage {name!r})" if len(documents) > 1 and name else
                             " (the final merge)" if len(documents) > 1 else "")
        stages.append(Stage(name, parse_config(doc, source=where, calibrate=calibrate),
                            out_dir if i == final else _within(intermediate, name), tuple(sorted(used))))
    return _ordered(stages, str(path))


def _substituted(value: Any, outputs: dict[str, str], used: set[str], key: str | None = None) -> Any:
    """Model references that name a stage, replaced by that stage's output directory."""
    if isinstance(value, dict):
        return {k: _substituted(v, outputs, used, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_substituted(v, outputs, used, key) for v in value]
    if isinstance(value, str) and key in ("model", "models", "base_model", "tokenizer_source", "source") \
            and value in outputs:
        used.add(value)
        return outputs[value]
    return value


def _ordered(stages: list[Stage], where: str) -> list[Stage]:
    """Dependencies first; otherwise the file's order."""
    by_name = {s.name: s for s in stages if s.name is not None}
    done: list[Stage] = []
    visiting: set[str | None] = set()

    def visit(stage: Stage) -> None:
        if stage in done:
            return
        if stage.name in visiting:
            raise DistSvcError(f"{where}: stage {stage.name!r} depends on itself through other stages; "
                               f"a stage can only use stages that do not use it.")
        visiting.add(stage.name)
        for need in stage.needs:
            visit(by_name[need])
        visiting.discard(stage.name)
        done.append(stage)

    for stage in stages:
        visit(stage)
    return done


def merge_stages(stages: list[Stage], configure: Callable[[MergeConfig], MergeConfig] = lambda c: c,
                 log: Callable[[str], None] = lambda line: None, **merge_options) -> Iterator:
    """Run the stages in order with dist_svc.merge (which resumes each), yielding each report as
    its stage finishes. `configure` adjusts each stage's config (the command line's options)."""
    from dist_svc.driver import merge

    for i, stage in enumerate(stages):
        if len(stages) > 1:
            log(f"stage {i + 1}/{len(stages)}: {stage.name or 'the final merge'} -> {stage.out_dir}")
        yield merge(configure(stage.config), stage.out_dir, log=log, **merge_options)
