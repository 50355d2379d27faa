"""Bad input gets one clear paragraph naming the file, tensor or field; inputs stay untouched."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import run_cli, run_cli_here, write_config


def _digest(path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())).hexdigest()


def _refused(tmp_path, cfg, *needles):
    result = run_cli_here("merge", cfg, tmp_path / "out")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr
    return result


def test_nan_in_a_fine_tune_names_the_tensor_and_file_and_touches_no_input(tmp_path, family):
    base, fts = family(2)
    path = fts[1] / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    inputs = base.parent
    before = _digest(inputs)
    _refused(tmp_path, write_config(tmp_path / "m.yaml", base, fts),
             "model.layers.1.mlp.down_proj.weight", str(path), "NaN")
    assert _digest(inputs) == before


def test_a_truncated_shard_is_named_before_anything_is_written(tmp_path, family):
    base, fts = family(2)
    shard = sorted(base.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    _refused(tmp_path, write_config(tmp_path / "m.yaml", base, fts), str(shard), "truncated")
    assert not (tmp_path / "out").exists()


def test_a_corrupt_header_is_named(tmp_path, family):
    base, fts = family(2)
    path = fts[0] / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[12:16] = b"\xff\xfe\x00\x01"
    path.write_bytes(bytes(raw))
    _refused(tmp_path, write_config(tmp_path / "m.yaml", base, fts), str(path), "corrupt")


def test_overlapping_offsets_are_named(tmp_path, family):
    base, fts = family(1)
    path = fts[0] / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    a, b = sorted(names, key=lambda k: header[k]["data_offsets"][0])[:2]
    header[b]["data_offsets"] = list(header[a]["data_offsets"])  # two tensors on the same bytes
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n:])
    _refused(tmp_path, write_config(tmp_path / "m.yaml", base, fts), str(path), "overlaps")


def test_a_tensor_of_a_dtype_dist_svc_cannot_read_is_refused_with_its_name(tmp_path, family):
    """Integer and bool tensors are copied (tests/test_buffers.py); an 8-bit float is neither."""
    base, fts = family(1)
    path = fts[0] / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.0.quant_scale"] = torch.ones(4).to(torch.float8_e4m3fn)
    save_file(tensors, str(path))
    _refused(tmp_path, write_config(tmp_path / "m.yaml", base, fts), "model.layers.0.quant_scale", "F8_E4M3")


def test_a_fine_tune_of_another_architecture_is_refused(tmp_path, family):
    base, fts = family(2)
    path = fts[1] / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:-1].clone()
    save_file(tensors, str(path))
    _refused(tmp_path, write_config(tmp_path / "m.yaml", base, fts), "model.layers.0.mlp.up_proj.weight",
             "shape", str(fts[1]))


def test_a_missing_tensor_is_named(tmp_path, family):
    base, fts = family(2)
    path = fts[0] / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.norm.weight"]
    save_file(tensors, str(path))
    _refused(tmp_path, write_config(tmp_path / "m.yaml", base, fts), "model.norm.weight", "missing", str(fts[0]))


def test_a_missing_model_directory_says_to_download_first(tmp_path, family):
    base, fts = family(1)
    _refused(tmp_path, write_config(tmp_path / "m.yaml", base, [tmp_path / "meta-llama/Llama-3-70B"]),
             "Llama-3-70B", "download")


def test_an_index_naming_a_missing_shard_is_named(tmp_path, family):
    base, fts = family(1)
    sorted(base.glob("model-*.safetensors"))[0].unlink()
    _refused(tmp_path, write_config(tmp_path / "m.yaml", base, fts), "model.safetensors.index.json", "missing")


@pytest.mark.parametrize("top, needle", [
    ({"merge_method": "slurp"}, "'merge_method': 'slurp' is not supported (did you mean 'slerp'?)"),
    ({"merge_method": ["x"]}, "'merge_method': ['x'] is not supported"),
    ({"parameters": {"lamda": 0.5}}, "'parameters.lamda': not a parameter of task_arithmetic (did you mean 'lambda'?)"),
    ({"parameters": {"lambda": "high"}}, "'parameters.lambda': expected a number"),
    ({"parameters": {"lambda": [0.1, "x"]}}, "'parameters.lambda[1]': expected a number"),
    ({"parameters": {"lambda": [{"filter": "mlp"}]}}, "'parameters.lambda[0]': expected {filter"),
    ({"parameters": {"normalize": [{"filter": 3, "value": True}]}}, "'parameters.normalize[0].filter'"),
    ({"parameters": {"int8_mask": 2.0}}, "'parameters.int8_mask': expected true or false (got 2.0)"),
    ({"calibrate": {"alpha": 0}}, "'calibrate.alpha': must be in (0, inf]"),
    ({"calibrate": {"side": "diagonal"}}, "'calibrate.side'"),
    ({"calibrate": {"target": 7}}, "'calibrate.target'"),
    ({"calibrate": "yes please"}, "'calibrate'"),
    ({"dtype": "int8"}, "'dtype': 'int8' is not a supported dtype"),
    ({"modules": {}}, "'modules': per-module configurations are not supported"),
    ({"slices": [{"sources": []}]}, "write exactly one of `models:`"),
    ({"tokenizer_source": 3}, "'tokenizer_source': expected base, union or a model's path"),
    ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, "not both"),
    ({"chat_template": "chatlm"}, "'chat_template': 'chatlm' is neither a template's name"),
    ({"merge_methd": "task_arithmetic"}, "'merge_methd': unknown field (did you mean 'merge_method'?)"),
])
def test_config_errors_name_the_file_and_field(tmp_path, family, top, needle):
    base, fts = family(2)
    cfg = write_config(tmp_path / "m.yaml", base, fts, **top)
    _refused(tmp_path, cfg, str(cfg), needle)


def test_every_problem_of_a_config_is_reported_at_once(tmp_path, family):
    base, fts = family(2)
    cfg = write_config(tmp_path / "m.yaml", base, fts, parameters={"lamda": 1, "normalize": "maybe"},
                       dtype="int4", calibrate={"side": "up"})
    result = _refused(tmp_path, cfg, str(cfg), "4 problems", "'parameters.lamda'", "'parameters.normalize'",
                      "'dtype'", "'calibrate.side'")
    assert result.stderr.count("\n  - ") == 4


def test_methods_and_fields_dist_svc_knows_are_checked_against_what_they_need(tmp_path, family):
    base, fts = family(3)
    cases = [
        ({"merge_method": "slerp"}, "slerp merges exactly 2 model(s)"),
        ({"merge_method": "slerp", "models": [{"model": str(fts[0])}]}, "slerp needs 't'"),
        ({"merge_method": "nuslerp"}, "nuslerp merges exactly 2 model(s) besides the base"),
        ({"merge_method": "model_stock", "models": [{"model": str(fts[0])}]}, "model_stock merges at least 3"),
        ({"merge_method": "della", "parameters": {"density": 0.9, "epsilon": 0.2}}, "keep probabilities outside (0, 1)"),
    ]
    for i, (top, needle) in enumerate(cases):
        models = top.pop("models", None)
        cfg = write_config(tmp_path / f"m{i}.yaml", base, fts, **top)
        if models is not None:
            import yaml

            raw = yaml.safe_load(cfg.read_text())
            raw["models"] = models
            cfg.write_text(yaml.safe_dump(raw))
        _refused(tmp_path, cfg, str(cfg), needle)


def test_a_config_that_is_not_yaml_is_named(tmp_path):
    cfg = tmp_path / "m.yaml"
    cfg.write_text("merge_method: [unclosed\n")
    _refused(tmp_path, cfg, str(cfg), "not valid YAML")


@pytest.mark.parametrize("content, needle", [
    ("# caf\u00e9 config\nmerge_method: task_arithmetic\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 5)"),
    (bytes(range(256)) * 4, "a binary file"),
    (b"merge_method: task_arithmetic\n" + b"#" * (5 << 20), "larger than 4 MiB"),
])
def test_a_config_file_that_is_not_utf8_yaml_is_named(tmp_path, content, needle):
    cfg = tmp_path / "m.yaml"
    cfg.write_bytes(content)
    _refused(tmp_path, cfg, str(cfg), needle)


def test_a_yaml_alias_bomb_is_refused_without_expanding_it(tmp_path):
    """Nine levels of nine aliases: 387M values from 400 bytes. Refused before anything walks it;
    the message stays short and the process small (it used to print a 722 MB message)."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("\n".join(levels) + "\nmerge_method: *a8\n")
    result = run_cli("merge", cfg, tmp_path / "out", check=False)
    assert result.returncode == 2 and "expands to more than" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr) < 1000
    import resource

    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 1 << 20  # KiB: under 1 GiB


def test_a_key_written_twice_is_refused_with_its_lines(tmp_path, family):
    base, fts = family(2)
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {fts[0]}\n"
                   f"    parameters: {{weight: 1.0, weight: 0.3}}\n  - model: {fts[1]}\n")
    _refused(tmp_path, cfg, str(cfg), "key 'weight' is written twice", "lines 5 and 5")
    cfg.write_text(f"merge_method: ties\nbase_model: {base}\nmodels: [{{model: {fts[0]}}}]\n"
                   f"merge_method: task_arithmetic\n")
    _refused(tmp_path, cfg, str(cfg), "key 'merge_method' is written twice", "lines 1 and 4")


def test_the_same_model_twice_is_refused_naming_both_entries(tmp_path, family):
    """mergekit refuses duplicate inputs too; counting one fine-tune twice is rarely meant (a
    larger weight says it)."""
    base, fts = family(2)
    cfg = write_config(tmp_path / "m.yaml", base, [fts[0], fts[1], fts[0]])
    _refused(tmp_path, cfg, str(cfg), "models[0] and models[2] are the same model")


def test_the_base_named_by_another_path_is_refused_naming_both(tmp_path, family):
    """The base written as its model.safetensors (or a fine-tune through a symlink) is the same
    files as base_model; counted as a task it would add a zero task vector (and dilute normalize)."""
    base, fts = family(2)
    file = base.parent / "single"
    from dist_svc.commands.demo import write_hf_checkpoint

    write_hf_checkpoint(file, {k: v for k, v in load_file(str(fts[0] / "model.safetensors")).items()})
    (tmp_path / "link").symlink_to(fts[0])
    cfg = write_config(tmp_path / "m.yaml", file, [fts[1], file / "model.safetensors"])
    _refused(tmp_path, cfg, str(cfg), "are the same checkpoint", str(file / "model.safetensors"))
    cfg = write_config(tmp_path / "m2.yaml", base, [fts[0], tmp_path / "link"])
    _refused(tmp_path, cfg, str(cfg), "models[0] and models[1] are the same model")


def test_status_of_a_directory_without_a_merge_says_so(tmp_path):
    result = run_cli("status", tmp_path, check=False)
    assert result.returncode == 2 and "no dist-svc merge here" in result.stderr


def test_vocabularies_of_different_sizes_without_a_tokenizer_setting_say_what_to_set(tmp_path, family):
    base, fts = family(2)
    path = fts[1] / "model.safetensors"
    tensors = load_file(str(path))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = torch.cat([tensors[name], tensors[name][:2]])
    save_file(tensors, str(path))
    _refused(tmp_path, write_config(tmp_path / "m.yaml", base, fts), "model.embed_tokens.weight",
             "tokenizer_source: union")


def test_the_chat_templates_a_config_may_name_are_the_ones_mergekit_ships():
    """Named templates are read from the installed mergekit (its text, its licence)."""
    pytest.importorskip("mergekit", reason="mergekit is not installed: pip install -e '.[test,compat]'")
    from importlib.resources import files

    from dist_svc.config import CHAT_TEMPLATE_NAMES
    from dist_svc.vocab import chat_template_text

    shipped = {p.name.removesuffix(".jinja") for p in files("mergekit._data.chat_templates").iterdir()
               if p.name.endswith(".jinja")}
    assert set(CHAT_TEMPLATE_NAMES) == shipped
    for name in CHAT_TEMPLATE_NAMES:
        assert chat_template_text(name, []) == (files("mergekit._data.chat_templates") / f"{name}.jinja").read_text()
