"""The layers stay layers: arrows point down the data flow (docs/design.md), never up. The
command line and its commands are the top: nothing of the pipeline imports them; the package's
face (`dist_svc/__init__.py`) is above every module, so none imports from it. And the command
line stays a thin shell: each command lives in its own module. Counted from the source, with `ast`."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dist_svc"
# The command layer: the command line, its commands, and the benchmarks (commands too).
COMMAND_LAYER = ("dist_svc.cli", "dist_svc.commands", "dist_svc.bench")


def _imports() -> dict[str, set[str]]:
    """Each module of dist_svc -> the modules it imports (at the top or inside functions)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
        found[module] = names
    return found


def _in(module: str, layer: str) -> bool:
    return module == layer or module.startswith(layer + ".")


def test_nothing_below_the_command_line_imports_the_commands():
    upward = {module: sorted(n for n in names if _in(n, "dist_svc.commands"))
              for module, names in _imports().items() if not any(_in(module, top) for top in COMMAND_LAYER)}
    assert {m: n for m, n in upward.items() if n} == {}


def test_no_module_imports_from_the_package_face():
    """`__version__` has its own module (dist_svc.version); the face imports the modules, not
    the other way round."""
    upward = sorted(module for module, names in _imports().items() if module != "dist_svc" and "dist_svc" in names)
    assert upward == []


def test_the_command_line_only_assembles_commands_defined_in_their_modules():
    """cli.py (the benchmarks' group aside, a package of their own) is under 200 lines and
    defines no command: every name it lists is a click command of a module of
    dist_svc/commands."""
    import click

    from dist_svc import cli

    source = (PACKAGE / "cli.py").read_text()
    tree = ast.parse(source)
    bench = set()
    for node in tree.body:
        decorators = [ast.unparse(d) for d in getattr(node, "decorator_list", [])]
        if any(d.startswith(("bench.", "main.group")) for d in decorators):
            bench.update(range(min(d.lineno for d in node.decorator_list), node.end_lineno + 1))
    commands = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)
                and any(ast.unparse(d).startswith("main.command") for d in node.decorator_list)]
    lines = [n for n, line in enumerate(source.splitlines(), 1) if n not in bench]
    assert len(lines) < 200, len(lines)
    assert commands == []
    for name, (where, line) in cli.COMMANDS.items():
        module, attr = where.split(":")
        assert module.startswith(("dist_svc.commands.", "dist_svc.bench"))
        command = cli.main.get_command(None, name)
        assert isinstance(command, click.Command), name
        # The line `dist-svc --help` shows (without importing the command) is the start of its own help.
        assert " ".join(command.help.split()).startswith(line.rstrip(".")), (name, line)


def test_the_list_of_commands_loads_no_command_and_no_torch():
    """`dist-svc --help` answers at once: it imports no command module (demo's imports torch)."""
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from dist_svc.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0 and 'sweep' in r.output, r.output; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('dist_svc.commands.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
