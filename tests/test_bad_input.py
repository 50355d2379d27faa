"""Bad input gets one clear paragraph naming the file, tensor or field; inputs stay untouched."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import run_cli, write_config


def _digest(path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())).hexdigest()


def _refused(tmp_path, cfg, *needles):
    result = run_cli("merge", cfg, tmp_path / "out", check=False)
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


def test_an_integer_tensor_is_refused_with_its_name(tmp_path, family):
    base, fts = family(1)
    path = fts[0] / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.0.quant_scale"] = torch.ones(4, dtype=torch.int32)
    save_file(tensors, str(path))
    _refused(tmp_path, write_config(tmp_path / "m.yaml", base, fts), "model.layers.0.quant_scale", "I32")


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
    ({"merge_method": "slerp"}, "'merge_method': 'slerp' is not supported"),
    ({"parameters": {"lamda": 0.5}}, "'parameters.lamda': not a parameter of task_arithmetic"),
    ({"parameters": {"lambda": "high"}}, "'parameters.lambda': expected a number"),
    ({"parameters": {"lambda": [0.1, "x"]}}, "'parameters.lambda[1]': expected a number"),
    ({"parameters": {"lambda": [{"filter": "mlp"}]}}, "'parameters.lambda[0]': expected {filter"),
    ({"parameters": {"normalize": [{"filter": 3, "value": True}]}}, "'parameters.normalize[0].filter'"),
    ({"calibrate": {"alpha": 0}}, "'calibrate.alpha': must be > 0"),
    ({"calibrate": {"side": "diagonal"}}, "'calibrate.side'"),
    ({"calibrate": {"target": 7}}, "'calibrate.target'"),
    ({"calibrate": "yes please"}, "'calibrate'"),
    ({"dtype": "int8"}, "'dtype': 'int8' is not a supported dtype"),
    ({"slices": []}, "'slices': layer slicing"),
    ({"tokenizer_source": "union"}, "'tokenizer_source'"),
    ({"merge_methd": "task_arithmetic"}, "'merge_methd': unknown field"),
])
def test_config_errors_name_the_file_and_field(tmp_path, family, top, needle):
    base, fts = family(2)
    cfg = write_config(tmp_path / "m.yaml", base, fts, **top)
    _refused(tmp_path, cfg, str(cfg), needle)


def test_a_config_that_is_not_yaml_is_named(tmp_path):
    cfg = tmp_path / "m.yaml"
    cfg.write_text("merge_method: [unclosed\n")
    _refused(tmp_path, cfg, str(cfg), "not valid YAML")


def test_status_of_a_directory_without_a_merge_says_so(tmp_path):
    result = run_cli("status", tmp_path, check=False)
    assert result.returncode == 2 and "no dist-svc merge here" in result.stderr
