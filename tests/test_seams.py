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


IMPLEMENTATIONS = {"LocalLocation", "RemoteLocation", "LocalFile", "RemoteFile", "LocalDir", "ObjectDir"}
STORAGE_MODULES = {"dist_svc/storage/location.py", "dist_svc/storage/outdir.py"}


def local_or_remote_checks(root: Path) -> list[str]:
    """Where the package under `root` asks whether storage is local or remote instead of asking
    what it can do: `.is_local`, `hasattr(x, "is_local")`, `isinstance(x, LocalDir)` and the
    like, as "file:line", outside the modules that implement `Location` and `OutputDir`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        name = str(path.relative_to(root.parent))
        if name in STORAGE_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            hit = False
            if isinstance(node, ast.Attribute) and node.attr == "is_local":
                hit = True
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
                args = [a for a in node.args[1:] for a in (a.elts if isinstance(a, ast.Tuple) else [a])]
                if node.func.id == "hasattr":
                    hit = any(isinstance(a, ast.Constant) and a.value == "is_local" for a in args)
                elif node.func.id == "isinstance":
                    hit = any(isinstance(a, (ast.Name, ast.Attribute)) and
                              (a.id if isinstance(a, ast.Name) else a.attr) in IMPLEMENTATIONS for a in args)
            if hit:
                found.append((name, node.lineno))
    return [f"{name}:{line}" for name, line in sorted(found)]


def test_only_the_storage_implementations_know_local_from_remote():
    """Readers, layouts, the manifest and the driver ask a `Location` or an `OutputDir` for a
    capability (`write_at_offset`, `file_paths`, ...), never which implementation it is: a
    new storage backend is then one module and its contract suite subclass."""
    assert local_or_remote_checks(PACKAGE) == []


def test_the_local_or_remote_count_sees_each_kind_of_check(tmp_path):
    """The counter above can fail: it finds each form of the check it forbids."""
    package = tmp_path / "dist_svc"
    package.mkdir()
    (package / "reader.py").write_text(
        "def f(loc, out):\n"
        "    if loc.is_local:\n"
        "        pass\n"
        "    x = hasattr(out, 'is_local')\n"
        "    y = isinstance(out, (LocalDir, storage.ObjectDir))\n"
        "    z = isinstance(out, dict)\n")
    assert local_or_remote_checks(package) == ["dist_svc/reader.py:2", "dist_svc/reader.py:4", "dist_svc/reader.py:5"]
