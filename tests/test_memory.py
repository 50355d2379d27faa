"""Memory: a unit's footprint (dist_svc.memory) bounds what its worker really holds, the local
executor admits units while they fit its budget (more in flight when memory allows, one at a
time when not), and a merge whose largest unit cannot fit is refused before anything is written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dist_svc import DistSvcError, merge
from dist_svc.commands.demo import TinyLlama, make_family
from dist_svc.executors import LocalExecutor
from dist_svc.blocks import BLOCK_ELEMENTS, READ_AHEAD
from dist_svc.memory import WRITE_BEHIND, Footprint, MemoryBudget, Pending, unit_footprint
from tests.conftest import file_bytes, write_config

# Matrices large enough that their buffers dwarf the allocator's noise (tens of MiB).
ARCH = TinyLlama(vocab_size=2048, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=2)

_PEAK_OF_A_UNIT = """
import dataclasses, json, pathlib, re, sys
from dist_svc.config import load_config
from dist_svc.driver import plan_merge
from dist_svc.memory import unit_footprint
from dist_svc.storage.output import layout_for
from dist_svc.worker import Job, Target, Worker, setup_process

# One config, or several (a batch, comma-separated: each its own output under OUT/N).
configs = [load_config(path) for path in sys.argv[1].split(",")]
plans = [plan_merge(config) for config in configs]
layouts = []
for n, (config, plan) in enumerate(zip(configs, plans)):
    out = pathlib.Path(sys.argv[2]) / str(n)
    out.mkdir()
    layouts.append(layout_for("safetensors", out, plan.entries(), config.output.options()))
    layouts[-1].prepare({})
setup_process("cpu")
options = json.loads(sys.argv[4])
others = tuple(Target(c, l) for c, l in zip(configs[1:], layouts[1:]))
worker = Worker(Job(configs[0], layouts[0], others=others), "cpu", **options)

def unit(name):
    units = [next(u for u in plan.units if u.name == name) for plan in plans]
    return units[0] if len(units) == 1 else dataclasses.replace(units[0], variants=tuple(enumerate(units)))

status = lambda key: int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
# Warm up on a small calibrated matrix: the process's one-time costs (libraries' lazy set-up)
# are its baseline, not the unit's.
worker.run(unit("model.layers.1.self_attn.k_proj.weight"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
measured = unit(sys.argv[3])
worker.run(measured)
print(json.dumps({"grew": status("VmHWM") - before,
                  "footprint": unit_footprint(measured, configs[0], configs=configs, **options).host}))
"""


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    base, fts = make_family(root, k=3, arch=ARCH, dtype=torch.bfloat16, shards=1)
    return root, base, fts


@pytest.mark.parametrize("tensor, method, options", [
    ("model.layers.0.mlp.up_proj.weight", "task_arithmetic", {}),  # tall, calibrated, pass-2 cache
    ("model.layers.0.mlp.down_proj.weight", "task_arithmetic", {}),  # wide: task Grams, output assembled
    ("model.layers.0.mlp.up_proj.weight", "task_arithmetic", {"cache_bytes": 0}),  # re-read, no cache
    ("model.layers.0.mlp.up_proj.weight", "task_arithmetic", {"block_elements": 1 << 18}),  # small blocks
    ("model.layers.0.input_layernorm.weight", "task_arithmetic", {}),  # tiny: the bound is the slack
    ("model.layers.0.self_attn.k_proj.weight", "task_arithmetic", {"cache_bytes": 0}),  # wide, re-read
    ("model.layers.0.mlp.gate_proj.weight", "ties", {}),  # whole tensors, calibrated
])
def test_a_units_footprint_bounds_the_memory_its_worker_really_holds(tmp_path, family, tensor, method, options):
    """Peak resident memory of a worker process around one unit (Linux VmHWM, reset first),
    against the formula. The bound must hold and not be loose beyond 3x: admission counts on it."""
    root, base, fts = family
    cfg = write_config(tmp_path / "m.yaml", base, fts, merge_method=method, dtype="float32",
                       parameters={"density": 0.5} if method == "ties" else {})
    _check_footprint(cfg, tmp_path / "out", tensor, options)


@pytest.mark.parametrize("tensor, sets", [
    ("model.layers.0.mlp.up_proj.weight", [{"parameters": {"lambda": lam}, "calibrate": {"alpha": alpha}}
                                           for lam in (0.5, 1, 1.5) for alpha in (0.3, 1)]),  # shared Grams
    ("model.layers.0.mlp.down_proj.weight", [{"parameters": {"lambda": lam}} for lam in (0.5, 1, 1.5)]),  # wide
    ("model.layers.0.mlp.up_proj.weight", [{"weights": [w, 1, 1]} for w in (0.5, 1)]
     + [{"weights": [1, 1, 1], "parameters": {"lambda": 2}}]),  # two computations of the method, one scaled
], ids=["lambda-alpha", "wide-lambda", "weights"])
def test_a_batch_units_footprint_bounds_what_its_worker_holds_for_every_variant(tmp_path, family, tensor, sets):
    """A unit read once for several merges (`Unit.variants`), against its footprint: every
    variant's output blocks, and each computation of the method, counted."""
    root, base, fts = family
    configs = [write_config(tmp_path / f"m{n}.yaml", base, fts, top.pop("weights", None), dtype="float32", **top)
               for n, top in enumerate(sets)]
    _check_footprint(configs, tmp_path / "out", tensor, {})


def test_more_units_run_at_once_when_memory_allows_and_the_bytes_do_not_change(tmp_path, family):
    root, base, fts = family
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    roomy = LocalExecutor(threads=2, memory_limit=8 << 30)
    merge(cfg, tmp_path / "roomy", progress="off", executor=roomy)
    # A budget that holds the largest unit but not two: one unit at a time.
    from dist_svc.config import load_config
    from dist_svc.driver import plan_merge

    config = load_config(cfg)
    needs = sorted(unit_footprint(u, config).host for u in plan_merge(config).units)
    tight = LocalExecutor(threads=2, memory_limit=needs[-1] + needs[0] // 2)
    merge(cfg, tmp_path / "tight", progress="off", executor=tight)
    assert roomy.peak_units == 2 and tight.peak_units >= 1
    assert file_bytes(tmp_path / "tight") == file_bytes(tmp_path / "roomy")


def test_a_unit_that_can_never_fit_is_refused_before_anything_is_written(tmp_path, family):
    root, base, fts = family
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    with pytest.raises(DistSvcError, match="tensor '.*' .* needs about .* MiB of memory to merge, more than the limit "
                                           "of 8.0 MiB. Raise the limit .--memory-limit."):
        merge(cfg, tmp_path / "out", progress="off", executor=LocalExecutor(memory_limit=8 << 20))
    assert not (tmp_path / "out").exists()


def test_admission_takes_the_largest_unit_that_fits_what_is_left():
    """Units of 6, 5, 3 and 1 GiB in a budget of 10: 6 first, then 3 (5 does not fit beside 6),
    then 1; once 6 is released, 5."""
    import threading

    gib = 1 << 30
    units = {name: Footprint(size * gib) for name, size in (("a", 6), ("b", 5), ("c", 3), ("d", 1))}
    pending = Pending(list(units.items()), key=lambda fp: fp.host)
    budget = MemoryBudget(10 * gib)
    stop = threading.Event()
    first, second, third = (budget.take(pending, stop) for _ in range(3))
    assert [t.unit for t in (first, second, third)] == ["a", "c", "d"]
    first.release()
    assert budget.take(pending, stop).unit == "b" and budget.peak_units == 3


def test_the_dry_run_says_what_fits_and_warns_when_the_largest_tensor_does_not(tmp_path, family):
    from tests.conftest import run_cli

    root, base, fts = family
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    roomy = run_cli("merge", cfg, tmp_path / "out", "--dry-run", "--memory-limit", "8GiB", "--threads", "2").stdout
    assert "2 of those at once" in roomy and "warning" not in roomy
    tight = run_cli("merge", cfg, tmp_path / "out", "--dry-run", "--memory-limit", "1MiB").stdout
    assert "0 of those at once" in tight and "does not fit the memory limit" in tight
    assert not (tmp_path / "out").exists()


def test_workers_spread_over_several_devices_write_the_same_bytes(tmp_path, family):
    """The local executor's device groups (one per GPU on a multi-GPU machine), here two groups
    on the CPU: the workers alternate between them, and the bytes are those of one group."""
    root, base, fts = family
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    merge(cfg, tmp_path / "one", progress="off", executor=LocalExecutor(threads=1))
    two = LocalExecutor(devices=["cpu", "cpu"], threads=4)
    assert "cpu, cpu" in two.describe()
    merge(cfg, tmp_path / "two", progress="off", executor=two)
    assert file_bytes(tmp_path / "two") == file_bytes(tmp_path / "one")


# Methods that need whole tensors and stream in passes (dist_svc.methods.base.Passes): their
# inputs' blocks kept between passes (the default cache) or read again each pass (cache 0), in
# row blocks or, calibrated on a wide matrix, in column blocks.
STREAMED = [
    # (tensor, method, parameters, fine-tunes, calibrate, worker options)
    ("model.layers.0.mlp.up_proj.weight", "ties", {"density": 0.3}, 3, False, {"block_elements": 1 << 18}),
    ("model.layers.0.mlp.up_proj.weight", "ties", {"density": 0.3}, 3, False,
     {"block_elements": 1 << 18, "cache_bytes": 0}),
    ("model.layers.0.mlp.up_proj.weight", "ties", {"density": 0.3, "rescale": True}, 3, True,
     {"block_elements": 1 << 18}),
    ("model.layers.0.mlp.down_proj.weight", "breadcrumbs_ties", {"density": 0.5, "gamma": 0.05}, 3, True,
     {"block_elements": 1 << 18}),  # wide, calibrated: column blocks, ties resolved by index passes
    ("model.layers.0.mlp.gate_proj.weight", "sce", {"select_topk": 0.4}, 3, False, {"block_elements": 1 << 18}),
    ("model.embed_tokens.weight", "breadcrumbs", {"density": 0.5}, 3, False, {"cache_bytes": 0}),
    ("model.layers.0.mlp.up_proj.weight", "model_stock", {}, 3, True, {"block_elements": 1 << 18}),
    ("model.layers.0.mlp.up_proj.weight", "karcher", {}, 3, False, {"block_elements": 1 << 18}),
    ("model.layers.0.mlp.up_proj.weight", "slerp", {"t": 0.3}, 1, False, {"block_elements": 1 << 18}),
    ("model.layers.0.mlp.down_proj.weight", "nuslerp", {"nuslerp_row_wise": True, "nuslerp_flatten": False}, 2, True,
     {"block_elements": 1 << 18, "cache_bytes": 0}),
]


@pytest.mark.parametrize("tensor, method, parameters, fine_tunes, calibrate, options", STREAMED,
                         ids=[f"{c[1]}-{c[0].split('.')[-2]}-{i}" for i, c in enumerate(STREAMED)])
def test_a_streamed_units_footprint_bounds_the_memory_its_worker_really_holds(
        tmp_path, family, tensor, method, parameters, fine_tunes, calibrate, options):
    root, base, fts = family
    cfg = write_config(tmp_path / "m.yaml", base, fts[:fine_tunes], merge_method=method, dtype="float32",
                       parameters=parameters, calibrate=calibrate)
    _check_footprint(cfg, tmp_path / "out", tensor, options)


_PEAK_OF_A_MERGE = """
import json, re, sys
from dist_svc import merge
from dist_svc.config import load_config
from dist_svc.driver import plan_merge
from dist_svc.executors import LocalExecutor
from dist_svc.memory import unit_footprint

config = load_config(sys.argv[1])
status = lambda key: int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
needs = sorted(unit_footprint(u, config).host for u in plan_merge(config).units)
before = status("VmRSS")
executor = LocalExecutor(device="cpu", threads=2)
merge(sys.argv[1], sys.argv[2], progress="off", executor=executor)
print(json.dumps({"grew": status("VmHWM") - before, "two_largest": sum(needs[-2:]), "units": executor.peak_units}))
"""


def test_a_two_worker_merge_of_wide_float32_matrices_holds_its_live_blocks_not_a_fragmented_heap(tmp_path):
    """Blocks of several sizes (rows of 2048 and of 5632 elements, each tensor's last block)
    allocated and freed by the reading, computing and writing threads of two workers: what the
    process holds follows its live buffers (per unit: the block computed and the one read ahead,
    of every input; the output block computed, the ones queued and the one being written), not
    the allocator's fragmentation (served from glibc's heap, the same merge held ~2x its live
    buffers, and the wide 310M merge of docs/benchmarks.md 1.2-1.5 GiB)."""
    arch = TinyLlama(vocab_size=4096, hidden_size=2048, intermediate_size=5632, num_hidden_layers=1,
                     num_attention_heads=16, num_key_value_heads=4)
    base, fts = make_family(tmp_path / "wide", k=3, arch=arch, dtype=torch.float32, shards=1)
    cfg = write_config(tmp_path / "m.yaml", base, fts, dtype="float32", out_dtype="float32",
                       parameters={"lambda": 0.3}, calibrate=False)
    measured = json.loads(subprocess.run([sys.executable, "-c", _PEAK_OF_A_MERGE, str(cfg), str(tmp_path / "out")],
                                         capture_output=True, text=True, check=True).stdout)
    block = BLOCK_ELEMENTS * 4
    live = 2 * ((1 + READ_AHEAD) * 4 * block + (2 + WRITE_BEHIND) * block)  # two units, 4 inputs each
    assert measured["units"] == 2
    assert measured["grew"] <= measured["two_largest"]
    assert measured["grew"] <= 1.25 * live, f"held {measured['grew'] / 2**20:.0f} MiB, live {live / 2**20:.0f} MiB"


def _check_footprint(cfg, out, tensor: str, options: dict) -> None:
    """One unit's peak resident growth in a worker process (_PEAK_OF_A_UNIT) is within its
    footprint, and the footprint not loose beyond 3x. `cfg`: a config, or several (a batch)."""
    out.mkdir()
    cfg = ",".join(map(str, cfg)) if isinstance(cfg, (list, tuple)) else cfg
    measured = json.loads(subprocess.run([sys.executable, "-c", _PEAK_OF_A_UNIT, str(cfg), str(out), tensor,
                                          json.dumps(options)], capture_output=True, text=True, check=True).stdout)
    grew, footprint = measured["grew"], measured["footprint"]
    assert grew <= footprint, f"{tensor}: held {grew / 2**20:.0f} MiB, footprint {footprint / 2**20:.0f} MiB"
    if footprint > 64 << 20:  # below, what the warm-up left for reuse hides the unit's own growth
        assert footprint <= 3 * grew + (16 << 20), f"{tensor}: footprint {footprint / 2**20:.0f} MiB is loose " \
                                                   f"(held {grew / 2**20:.0f} MiB)"
