"""dist-svc against mergekit: the same mergekit YAML on the same generated inputs, the tools
interleaved round by round (a machine's load moves both alike), each run in a fresh process tree
whose wall time and peak resident memory (summed over the tree) are measured; then how far the
two outputs agree."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Sequence

# Each method's settings for the YAML both tools run: (parameters, each fine-tune's parameters,
# how many fine-tunes (None: all)). Those of `dist-svc demo --methods`, and for the rest what a
# user would start from (density 0.5, SLERP halfway).
METHOD_SETTINGS: dict[str, tuple[dict, dict, int | None]] = {
    "task_arithmetic": ({"lambda": 0.3}, {"weight": 1.0}, None),
    "passthrough": ({}, {}, 1),
    "iso_cts": ({}, {}, None),
}
# Methods whose outputs are compared element by element: a magnitude selection keeps different
# elements where magnitudes tie exactly, so "the same" means few elements apart.
SELECTION = ("ties", "breadcrumbs", "breadcrumbs_ties", "sce", "dare_ties", "della")
TOLERANCE = 1e-5

_MEASURE = """
import json, os, resource, subprocess, sys, threading, time

def tree_rss(root):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
    return total

start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
peak, done = [0], threading.Event()
def sample():
    while not done.wait(0.05):
        peak[0] = max(peak[0], tree_rss(proc.pid))
threading.Thread(target=sample, daemon=True).start()
stderr = proc.communicate()[1]
wall = time.perf_counter() - start
done.set()
largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": proc.returncode, "wall_s": wall, "stderr": stderr[-2000:],
                  "peak_rss_bytes": max(peak[0], largest)}))
"""


def measure(command: list[str], check: bool = True) -> dict:
    """Wall time and peak resident memory of one command and the processes it starts, measured by
    a fresh process of its own: the larger of the tree's resident memory summed every 50 ms and
    the largest single process's exact peak (RUSAGE_CHILDREN)."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    if check and result["rc"] != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result['rc']}):\n{result['stderr']}")
    return result


def merge_methods() -> list[str]:
    from dist_svc.methods import METHODS

    return list(METHODS)


def settings(method: str) -> tuple[dict, dict, int | None]:
    from dist_svc.commands.demo import DEMO_METHODS

    return METHOD_SETTINGS.get(method) or DEMO_METHODS[method]


def bench_config(root: Path, method: str, k: int, out_dtype: str) -> Path:
    """The mergekit YAML both tools run (float32 compute)."""
    import yaml

    from dist_svc.methods import METHODS

    params, own, count = settings(method)
    fts = [root / f"ft-{i + 1}" for i in range(k)][:count]
    config = {"merge_method": method}
    if METHODS[method].max_inputs != 1:  # passthrough takes its one model alone
        config["base_model"] = str(root / "base")
    config["models"] = [{"model": str(f), **({"parameters": dict(own)} if own else {})} for f in fts]
    if params:
        config["parameters"] = dict(params)
    config.update(dtype="float32", out_dtype=out_dtype)
    path = root / f"mergekit-{method}-{out_dtype}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def bench_merge(workdir, method: str = "task_arithmetic", layers: Sequence[int] = (10, 20), hidden: int = 1024,
                intermediate: int = 2816, vocab: int = 32000, in_dtype: str = "bfloat16",
                out_dtype: str = "bfloat16", k: int = 3, repeats: int = 3, mergekit: str | None = "mergekit-yaml",
                log=print) -> list[dict]:
    """One row per model size: medians of wall time and peak memory of each tool, their ratios,
    and the outputs' agreement. Models are generated (and kept) under `workdir`; the inputs are
    read once before the first round, so that both tools find them in the page cache."""
    import torch

    from dist_svc.commands.demo import TinyLlama, make_family
    from dist_svc.methods import METHODS

    workdir = Path(workdir).resolve()
    rows = []
    for n_layers in layers:
        arch = TinyLlama(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=n_layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 256))
        root = workdir / f"llama-h{hidden}-i{intermediate}-v{vocab}-{n_layers}l-k{k}-{in_dtype}"
        if not (root / f"ft-{k}" / "config.json").is_file():
            log(f"generating {root} ...")
            make_family(root, k=k, arch=arch, dtype=getattr(torch, in_dtype), shards=2)
        _read_once([root / "base", *(root / f"ft-{i + 1}" for i in range(k))])
        config = bench_config(root, method, k, out_dtype)
        tools = {"dist-svc": [sys.executable, "-m", "dist_svc.cli", "merge", str(config), None,
                              "--no-calibrate", "--progress", "off"]}
        if mergekit:
            tools["mergekit"] = [mergekit, str(config), None, "--quiet"]
        runs: dict[str, list[dict]] = {name: [] for name in tools}
        error = None
        for _ in range(repeats):
            for name, command in tools.items():
                if name == "mergekit" and error:
                    continue
                out = root / f"out-{name}"
                shutil.rmtree(out, ignore_errors=True)
                result = measure([c if c is not None else str(out) for c in command], check=name != "mergekit")
                if result["rc"]:
                    error = (result["stderr"].strip().splitlines() or ["exit status %d" % result["rc"]])[-1][:200]
                    log(f"{n_layers} layers, mergekit failed: {error}")
                    continue
                runs[name].append(result)
                log(f"{n_layers} layers, {method}, {name}: {result['wall_s']:.1f} s, "
                    f"{result['peak_rss_bytes'] / 2**20:.0f} MiB")
        row = {"method": method, "layers": n_layers, "params": sum(math.prod(s) for s in arch.shapes().values()),
               "k": k, "hidden": hidden, "intermediate": intermediate, "vocab": vocab, "in_dtype": in_dtype,
               "out_dtype": out_dtype, "repeats": repeats}
        for name, results in runs.items():
            if results:
                row[f"{name}_wall_s"] = statistics.median(r["wall_s"] for r in results)
                row[f"{name}_peak_mib"] = statistics.median(r["peak_rss_bytes"] for r in results) / 2**20
        if mergekit and error:
            row["mergekit_error"] = error
        elif mergekit:
            row["time_ratio"] = row["dist-svc_wall_s"] / row["mergekit_wall_s"]
            row["memory_ratio"] = row["dist-svc_peak_mib"] / row["mergekit_peak_mib"]
            if METHODS[method].random:  # the tools draw different random numbers (docs/methods.md)
                row["agreement"] = "not compared (random)"
            else:
                row.update(compare_outputs(root / "out-dist-svc", root / "out-mergekit"))
                row["agreement"] = describe(row, method)
        rows.append(row)
    return rows


def bench_sweep(workdir, layers: int = 4, hidden: int = 1024, intermediate: int = 2816, vocab: int = 32000,
                in_dtype: str = "float32", out_dtype: str = "float32", k: int = 3, repeats: int = 3,
                lambdas: Sequence[float] = (0.3, 0.5, 1.0), alphas: Sequence[float] = (0.3333, 1.0),
                calibrate: bool = True, cluster: str | None = None, separate: bool = False, log=print) -> dict:
    """`dist-svc sweep` of lambda x alpha task arithmetic against one `dist-svc merge` of the same
    config (and, with `separate`, against merging each variant on its own), interleaved round by
    round: medians of wall time and peak memory, and the ratios."""
    import torch
    import yaml

    from dist_svc.commands.demo import TinyLlama, make_family

    workdir = Path(workdir).resolve()
    arch = TinyLlama(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                     num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256))
    root = workdir / f"llama-h{hidden}-i{intermediate}-v{vocab}-{layers}l-k{k}-{in_dtype}"
    if not (root / f"ft-{k}" / "config.json").is_file():
        log(f"generating {root} ...")
        make_family(root, k=k, arch=arch, dtype=getattr(torch, in_dtype), shards=2)
    _read_once([root / "base", *(root / f"ft-{i + 1}" for i in range(k))])
    config = bench_config(root, "task_arithmetic", k, out_dtype)
    sets = ["--set", "parameters.lambda=" + ",".join(map(str, lambdas))]
    if calibrate:
        sets += ["--set", "calibrate.alpha=" + ",".join(map(str, alphas))]
    common = ["--progress", "off"] + ([] if calibrate else ["--no-calibrate"]) + (["--cluster", cluster] if cluster else [])
    cli = [sys.executable, "-m", "dist_svc.cli"]
    tools = {"one merge": cli + ["merge", str(config), None] + common,
             "sweep": cli + ["sweep", str(config), None] + sets + common}
    variants = len(lambdas) * (len(alphas) if calibrate else 1)
    runs: dict[str, list[dict]] = {name: [] for name in [*tools, *(["separate"] if separate else [])]}
    for _ in range(repeats):
        for name, command in tools.items():
            out = root / f"out-{name.replace(' ', '-')}"
            shutil.rmtree(out, ignore_errors=True)
            runs[name].append(measure([c if c is not None else str(out) for c in command]))
            log(f"{name}: {runs[name][-1]['wall_s']:.1f} s, {runs[name][-1]['peak_rss_bytes'] / 2**20:.0f} MiB")
        if separate:  # each variant merged on its own, one after another
            doc = yaml.safe_load(config.read_text())
            total, peak = 0.0, 0
            for lam in lambdas:
                for alpha in (alphas if calibrate else (None,)):
                    one = dict(doc, parameters=dict(doc.get("parameters", {}), **{"lambda": lam}))
                    if alpha is not None:
                        one["calibrate"] = {"alpha": alpha}
                    path = root / "separate.yaml"
                    path.write_text(yaml.safe_dump(one, sort_keys=False))
                    out = root / "out-separate"
                    shutil.rmtree(out, ignore_errors=True)
                    result = measure(cli + ["merge", str(path), str(out)] + common)
                    total, peak = total + result["wall_s"], max(peak, result["peak_rss_bytes"])
            runs["separate"].append({"wall_s": total, "peak_rss_bytes": peak})
            log(f"separate: {total:.1f} s, {peak / 2**20:.0f} MiB")
    row = {"layers": layers, "hidden": hidden, "intermediate": intermediate, "vocab": vocab, "k": k,
           "params": sum(math.prod(s) for s in arch.shapes().values()), "in_dtype": in_dtype, "out_dtype": out_dtype,
           "variants": variants, "calibrate": calibrate, "cluster": cluster, "repeats": repeats}
    for name, results in runs.items():
        row[f"{name}_wall_s"] = statistics.median(r["wall_s"] for r in results)
        row[f"{name}_peak_mib"] = statistics.median(r["peak_rss_bytes"] for r in results) / 2**20
    row["time_ratio"] = row["sweep_wall_s"] / row["one merge_wall_s"]
    row["memory_ratio"] = row["sweep_peak_mib"] / row["one merge_peak_mib"]
    if separate:
        row["separate_ratio"] = row["separate_wall_s"] / row["one merge_wall_s"]
    return row


def _read_once(checkpoints: list[Path]) -> None:
    for f in sorted(f for d in checkpoints for f in d.glob("*.safetensors")):
        with open(f, "rb") as src:
            while src.read(64 << 20):
                pass


def compare_outputs(a: Path, b: Path) -> dict:
    """Tensor by tensor (one pair in memory at a time): whether every tensor is equal, the
    largest absolute difference, and the fraction of elements more than TOLERANCE apart."""
    import torch
    from safetensors import safe_open

    def where(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({name: f for name in h.keys()})
        return out

    wa, wb = where(a), where(b)
    if set(wa) != set(wb):
        return {"same_names": False, "same_bytes": False}
    equal, max_diff, apart, total = True, 0.0, 0, 0
    for name in sorted(wa):
        with safe_open(str(wa[name]), "pt") as ha, safe_open(str(wb[name]), "pt") as hb:
            x, y = ha.get_tensor(name), hb.get_tensor(name)
        equal = equal and x.dtype == y.dtype and torch.equal(x, y)
        if x.is_floating_point():
            diff = (x.double() - y.double()).abs()
            max_diff = max(max_diff, float(diff.max()) if diff.numel() else 0.0)
            apart += int((diff > TOLERANCE).sum())
            total += diff.numel()
    return {"same_names": True, "same_bytes": equal, "max_abs_diff": max_diff,
            "fraction_apart": apart / max(total, 1)}


def describe(row: dict, method: str) -> str:
    if not row.get("same_names"):
        return "different tensor names"
    if row["same_bytes"]:
        return "same bytes"
    text = f"max |diff| {row['max_abs_diff']:.1e}"
    if method in SELECTION:
        text += f", {row['fraction_apart']:.1e} of elements > {TOLERANCE:g} apart"
    return text
