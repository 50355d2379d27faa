"""Any safetensors header either merges correctly or is refused with DistSvcError: never another
exception, never a hang. Headers are a valid one mutated by hypothesis (fields replaced by any
JSON value, keys dropped or added, offsets and shapes bent), over the same data bytes; a merge
that succeeds is checked against what the safetensors library itself reads from the file."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from dist_svc import DistSvcError, merge
from tests.conftest import write_config
from tests.reference import load_output

BASE = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(3, dtype=torch.float32)}
FT = {"a": BASE["a"] + 0.5, "b": BASE["b"] * 2}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "F8_E4M3", "BOOL"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12)


@st.composite
def mutated_headers(draw) -> dict:
    """The fine-tune's valid header with a few random mutations."""
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]}}
    if draw(st.booleans()):  # the same bytes, laid out the other way round: still valid
        header["a"]["data_offsets"], header["b"]["data_offsets"] = [12, 36], [0, 12]
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        target = draw(st.sampled_from(["a", "b", "__metadata__", "new"]))
        kind = draw(st.sampled_from(["field", "drop", "replace", "shape", "offsets", "dtype"]))
        entry = header.get(target)
        if kind == "replace" or not isinstance(entry, dict) or target == "__metadata__":
            header[target] = draw(json_values)
        elif kind == "drop":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif kind == "field":
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = draw(json_values)
        elif kind == "shape":
            entry["shape"] = draw(st.lists(st.integers(-1, 2**64), max_size=4) | st.just([3, 2]) | st.just([0, 2**62]))
        elif kind == "offsets":
            entry["data_offsets"] = draw(st.lists(st.integers(-5, 2**64), min_size=2, max_size=2)
                                         | st.sampled_from([[24, 36], [0, 24], [12, 36]]))
        else:
            entry["dtype"] = draw(st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "Q4", "f32"]))
    return header


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("header-property")
    (root / "base").mkdir()
    save_file(BASE, str(root / "base" / "model.safetensors"))
    return root


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=mutated_headers())
def test_any_header_merges_correctly_or_is_refused_clearly(base_dir, header):
    import shutil
    import tempfile

    work = __import__("pathlib").Path(tempfile.mkdtemp(dir=base_dir))
    try:
        (work / "ft").mkdir()
        body = json.dumps(header).encode()
        data = b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in FT.values())
        (work / "ft" / "model.safetensors").write_bytes(len(body).to_bytes(8, "little") + body + data)
        cfg = write_config(work / "m.yaml", base_dir / "base", [work / "ft"], calibrate=False)
        start = time.monotonic()
        try:
            merge(cfg, work / "out", progress="off")
        except DistSvcError as e:
            assert len(str(e)) < 2000  # one paragraph, whatever the header held
            event("refused")
        else:
            event("merged")
            # Merged: then the header was valid, and the result is base + (ft - base) as the
            # safetensors library reads the fine-tune (float32, exact for these values).
            ft = load_file(str(work / "ft" / "model.safetensors"))
            out = load_output(work / "out")
            for name, b in BASE.items():
                np.testing.assert_array_equal(out[name].numpy(), ft[name].float().numpy())
                assert out[name].shape == b.shape
        assert time.monotonic() - start < 30  # no hang on absurd extents
    finally:
        shutil.rmtree(work, ignore_errors=True)
