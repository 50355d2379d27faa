"""`dist-svc bench merge`: a YAML both tools accept for every method, and peak memory measured
over the whole process tree."""

from __future__ import annotations

import sys

import pytest

from dist_svc.bench.merge import bench_config, measure, merge_methods
from dist_svc.commands.demo import TinyLlama, make_family
from dist_svc.config import load_config


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("bench")
    make_family(root, k=3, arch=TinyLlama(num_hidden_layers=1), dtype=torch.float32, shards=1)
    return root


@pytest.mark.parametrize("method", merge_methods())
def test_bench_merge_writes_a_config_dist_svc_accepts_for_every_registered_method(family, method):
    config = load_config(bench_config(family, method, 3, "float32"))
    assert config.merge_method == method and config.out_dtype == "float32"


def test_peak_memory_counts_the_processes_a_command_starts():
    child = "import time; x = bytearray(300 << 20); x[::4096] = b'1' * len(x[::4096]); time.sleep(1.0)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}], check=True)"
    result = measure([sys.executable, "-c", parent])
    assert result["rc"] == 0 and result["peak_rss_bytes"] >= 300 << 20
