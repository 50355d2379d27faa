"""The seams stay seams: each implementation of a seam is named in exactly one place (its
registration), so adding one touches only its own module, that place and its tests
(docs/extending.md). Counted from the source, with `ast`."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dist_svc"


def _references(target: str) -> set[str]:
    """Modules of dist_svc that import `target` or name it in a string (a lazy registry)."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        if module == target:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [node.value.split(":")[0]]
            if target in names:
                found.add(module)
    return found


def test_output_layouts_are_named_only_by_the_layout_registry():
    for layout in ("dist_svc.storage.safetensors_output", "dist_svc.storage.zarr_output"):
        assert _references(layout) == {"dist_svc.storage.output"}, layout


def test_checkpoint_readers_are_named_only_by_open_checkpoint():
    for reader in ("dist_svc.storage.zarr_reader", "dist_svc.storage.safetensors_reader",
                   "dist_svc.storage.torch_reader", "dist_svc.storage.lora_reader"):
        assert _references(reader) == {"dist_svc.storage"}, reader


def test_executors_are_named_only_by_build_executor():
    assert _references("dist_svc.executors.ray_cluster") == {"dist_svc.executors"}
    assert _references("dist_svc.executors.local") == {"dist_svc.executors"}



def test_design_md_lists_every_module_once():
    """docs/design.md's module table names every module of the package exactly once; a row for
    a folder (`dist_svc/methods/`) names its modules by file name."""
    import re

    table = (PACKAGE.parent / "docs" / "design.md").read_text().split("## Plan")[0]
    named = re.findall(r"`(dist_svc/[\w/]+\.py)`", table)
    for folder, row in re.findall(r"\| `(dist_svc/\w+/)` \| ([^\n]+)", table):
        named += [folder + m for m in re.findall(r"`(\w+\.py)`", row)]
    modules = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
               if p.name != "__init__.py" or p.parent.name in ("storage", "executors", "methods")]
    assert len(named) == len(set(named)), "a module is listed twice"
    assert sorted(named) == sorted(modules)
