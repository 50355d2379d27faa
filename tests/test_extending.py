"""docs/extending.md, tried as written: a new merge method is its module and a docs row; a new
output format is its module, a line in the format registry and a docs row. Everything else
picks them up by itself: the method contract tests, the layout contract suite, config
validation, `demo --methods`, `merge`, `convert`, `status`, `verify` and the CLI's choices.

The throwaway method and layout are written as files (in a temporary directory on sys.path),
registered for this module only, and taken out of the registries afterwards."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dist_svc.config import parse_config
from dist_svc.driver import open_output
from dist_svc.errors import DistSvcError
from dist_svc.methods import METHODS
from dist_svc.storage.output import FORMATS, format_names, format_of
from tests.contracts import OutputLayoutContract
from tests.reference import load_output
from tests.test_methods import documented, gives_the_same_result_block_by_block, \
    leaves_its_inputs_and_repeats_itself, streamed

REPO = Path(__file__).resolve().parent.parent

# File 1 of a new method: its function and registration (in practice a module under dist_svc/methods/).
METHOD_MODULE = '''
"""A weighted sum of the task vectors, scaled."""
from dist_svc.methods.base import REQUIRED, WEIGHT, Param, register


@register("scaled_sum", Param("scale", REQUIRED, low=0.0, doc="multiplies the weighted sum"), WEIGHT,
          sample={"scale": 0.5, "weight": 1.0})
def scaled_sum(deltas, p, where):
    out = deltas[0] * (p["weight"][0] * p["scale"])
    for w, d in zip(p["weight"][1:], deltas[1:]):
        out = out + d * (w * p["scale"])
    return out
'''
METHOD_ROW = ("| `scaled_sum` | (not in mergekit) | `scale * sum_i w_i tau_i` | `scale` (required) | `weight` (1.0) "
              "| element | as TA |\n")

# File 1 of a new output format: its layout (in practice dist_svc/storage/<name>_output.py).
LAYOUT_MODULE = '''
"""safetensors shards of 64 KiB at most by default: many small files."""
from dist_svc.storage.safetensors_output import SafetensorsLayout


class SmallShardsLayout(SafetensorsLayout):
    format = "small_shards"
'''
# File 2: its line in the registry (in practice one more entry of FORMATS in dist_svc/storage/output.py).
REGISTRY_LINE = '''
from dist_svc.storage.output import FORMATS, SHARD_SIZE, Option, OutputFormat

FORMATS["small_shards"] = OutputFormat("small_shards", "small_shards_output:SmallShardsLayout",
                                       {"shard_size": Option("shard_bytes", 64 << 10, SHARD_SIZE.read)},
                                       suffix=".small")
'''
# File 3: its row in docs/storage.md's table of output formats.
FORMAT_ROW = "| `small_shards` | safetensors shards of 64 KiB | `shard_size` (64 KiB) | `.small` |\n"


@pytest.fixture(scope="module")
def extension(tmp_path_factory):
    """The throwaway method and output format, registered as their files would register them;
    both registries as they were afterwards. Yields the directory holding the files."""
    root = tmp_path_factory.mktemp("extension")
    (root / "scaled_sum.py").write_text(METHOD_MODULE)
    (root / "small_shards_output.py").write_text(LAYOUT_MODULE)
    (root / "registry_line.py").write_text(REGISTRY_LINE)
    methods_before, formats_before = dict(METHODS), dict(FORMATS)
    sys.path.insert(0, str(root))
    try:
        import registry_line  # noqa: F401
        import scaled_sum  # noqa: F401

        yield root
    finally:
        sys.path.remove(str(root))
        for module in ("scaled_sum", "small_shards_output", "registry_line"):
            sys.modules.pop(module, None)
        METHODS.clear()
        METHODS.update(methods_before)
        FORMATS.clear()
        FORMATS.update(formats_before)


def cli(root: Path, *args, check: bool = True) -> subprocess.CompletedProcess:
    """`dist-svc ARGS` in a fresh process that imports the extension's files first, as the
    package imports its own registry."""
    boot = (f"import sys; sys.path.insert(0, {str(root)!r}); import scaled_sum, registry_line; "
            f"from dist_svc.cli import main; main(prog_name='dist-svc')")
    proc = subprocess.run([sys.executable, "-c", boot, *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"dist-svc {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def with_row(tmp_path: Path, doc: str, row: str) -> Path:
    path = tmp_path / doc
    path.write_text((REPO / "docs" / doc).read_text() + row)
    return path


# -- a merge method ---------------------------------------------------------------------------------

def test_a_new_method_runs_the_method_contract_tests_and_needs_its_docs_row(extension, tmp_path):
    assert "scaled_sum" in METHODS and streamed("scaled_sum")
    leaves_its_inputs_and_repeats_itself("scaled_sum")
    gives_the_same_result_block_by_block("scaled_sum")
    with pytest.raises(AssertionError, match=r"no row for scaled_sum \(registered in scaled_sum\)"):
        documented("scaled_sum")
    documented("scaled_sum", with_row(tmp_path, "methods.md", METHOD_ROW))


def test_a_new_method_is_validated_from_its_declaration_and_in_the_demo(extension, tmp_path):
    from dist_svc.commands.demo import DEMO_METHODS, write_method_config

    config = {"merge_method": "scaled_sum", "base_model": str(tmp_path / "b"),
              "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 2.0, "scales": 1}}],
              "parameters": {"scale": -1}}
    with pytest.raises(DistSvcError) as refused:
        parse_config(config)
    assert "'parameters.scale': must be in (0, inf]" in str(refused.value)
    assert "'models[0].parameters.scales': not a parameter of scaled_sum (did you mean 'scale'?)" in str(refused.value)
    assert "scaled_sum" in list(DEMO_METHODS)  # `demo --methods all` runs it
    assert DEMO_METHODS["scaled_sum"] == ({"scale": 0.5}, {"weight": 1.0}, None)
    written = write_method_config(tmp_path / "demo.yaml", "scaled_sum", tmp_path / "b", [tmp_path / "a"])
    parsed = parse_config(yaml.safe_load(written.read_text()))
    assert parsed.parameters == {"scale": 0.5} and parsed.slices[0].sources[0].parameters == {"weight": 1.0}


# -- an output format -------------------------------------------------------------------------------

class TestSmallShardsLayout(OutputLayoutContract):
    """The contract suite, on the throwaway layout, unchanged."""

    FORMAT = "small_shards"
    OPTIONS = {"shard_bytes": 1000}

    @pytest.fixture(autouse=True)
    def _registered(self, extension):
        pass

    def flip_a_byte(self, root, layout, name):
        place = layout.placements[name]
        path = layout.final(place.shard)
        raw = bytearray(path.read_bytes())
        raw[place.offset + place.nbytes // 2] ^= 0x01
        path.write_bytes(bytes(raw))


def format_documented(name: str, docs: Path = REPO / "docs" / "storage.md") -> None:
    import re

    assert re.search(rf"^\| `{re.escape(name)}` \|", docs.read_text(), re.M), (
        f"{docs.name} has no row for output format {name} (its layout: {FORMATS[name].layout}); add "
        f"'| `{name}` | ...' to its table of output formats")


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_output_format_has_its_row_in_the_docs(name):
    format_documented(name)


def test_a_new_output_format_is_valid_in_the_config_with_its_own_options(extension, tmp_path):
    assert format_names() == ["safetensors", "zarr", "peft", "small_shards"]
    assert format_names(convertible=True) == ["safetensors", "zarr", "small_shards"]
    assert format_of(tmp_path / "out.small") == "small_shards" and format_of(tmp_path / "out.zarr") == "zarr"
    base = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "b"), "models": [str(tmp_path / "a")]}
    config = parse_config({**base, "output": {"format": "small_shards", "shard_size": "8KB"}})
    assert config.output.options() == {"shard_bytes": 8000}
    assert parse_config({**base, "output": "small_shards"}).output.options() == {"shard_bytes": 64 << 10}
    with pytest.raises(DistSvcError, match=r"'output.compression': only zarr output takes compression; "
                                           r"small_shards does not"):
        parse_config({**base, "output": {"format": "small_shards", "compression": "zstd"}})
    with pytest.raises(AssertionError, match=r"no row for output format small_shards \(its layout: small_shards"):
        format_documented("small_shards")
    format_documented("small_shards", with_row(tmp_path, "storage.md", FORMAT_ROW))


def test_the_cli_merges_converts_and_verifies_with_the_new_method_and_format(extension, tmp_path, family):
    base, fts = family(k=2)
    for command in ("merge", "convert"):
        assert "small_shards" in cli(extension, command, "--help").stdout
    config = tmp_path / "m.yaml"
    config.write_text(yaml.safe_dump({
        "merge_method": "scaled_sum", "base_model": str(base), "parameters": {"scale": 0.5}, "calibrate": False,
        "models": [{"model": str(f), "parameters": {"weight": w}} for f, w in zip(fts, (1.0, 3.0))]}))
    out = tmp_path / "merged.small"  # the suffix chooses the format
    cli(extension, "merge", config, out, "--progress", "off", "--shard-size", "16KB")
    assert open_output(out)[1].format == "small_shards"
    assert "verified" in cli(extension, "verify", out).stdout
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 5 and all(p.stat().st_size <= 16_000 + 4096 for p in shards)  # header aside
    # The merged values: base + 0.5 (1 tau_1 + 3 tau_2), against float64.
    got, b = load_output(out), load_output(base)
    f1, f2 = load_output(fts[0]), load_output(fts[1])
    for name, tensor in got.items():
        x = [t[name].double() for t in (b, f1, f2)]
        expected = x[0] + 0.5 * ((x[1] - x[0]) + 3.0 * (x[2] - x[0]))
        assert torch.allclose(tensor.double(), expected, rtol=1e-5, atol=1e-6), name
    # `convert` writes it too, chosen by the suffix or by name, and its options are checked by the format.
    cli(extension, "convert", out, tmp_path / "again.small", "--progress", "off")
    cli(extension, "convert", out, tmp_path / "again", "--format", "small_shards", "--progress", "off")
    for copy in (tmp_path / "again.small", tmp_path / "again"):
        converted = load_output(copy)
        assert set(converted) == set(got) and all(np.array_equal(converted[n], got[n]) for n in got)
    refused = cli(extension, "convert", out, tmp_path / "z.small", "--compression", "zstd", check=False)
    assert refused.returncode != 0 and "only zarr output takes compression; small_shards does not" in refused.stderr
    assert not (tmp_path / "z.small").exists()
