"""`dist-svc sweep`: every variant is what `dist-svc merge` writes for the config with its values
set, byte for byte; bad input is refused, all of it at once, before anything is written; the
record (sweep.json/csv) and the evaluation are as documented; a rerun resumes."""

from __future__ import annotations

import collections
import itertools
import json
import sys

import pytest
import yaml

from dist_svc.batch import with_setting
from tests.conftest import file_bytes, kill_mid_run, run_cli, write_config


def _config(tmp_path, family, **top):
    base, fts = family(k=2)
    return write_config(tmp_path / "merge.yaml", base, fts, **top), base, fts


def test_each_variant_is_the_merge_of_its_config_byte_for_byte(tmp_path, family):
    """Two axes (lambda x alpha): four directories, each equal to a separate merge of the config
    with those values written into it; sweep.json lists them with numbers as numbers."""
    cfg, base, fts = _config(tmp_path, family, parameters={"lambda": 0.5})
    out = tmp_path / "sweep"
    run_cli("sweep", cfg, out, "--set", "parameters.lambda=0.5,1.0", "--set", "calibrate.alpha=0.5,1")
    record = json.loads((out / "sweep.json").read_text())
    paths = [v["path"] for v in record["variants"]]
    assert paths == ["lambda=0.5,alpha=0.5", "lambda=0.5,alpha=1", "lambda=1.0,alpha=0.5", "lambda=1.0,alpha=1"]
    assert record["variants"][1]["settings"] == {"parameters.lambda": 0.5, "calibrate.alpha": 1}
    for lam, alpha in [(0.5, 0.5), (1.0, 1)]:
        single = write_config(tmp_path / f"one-{lam}-{alpha}.yaml", base, fts, parameters={"lambda": lam},
                              calibrate={"alpha": alpha})
        run_cli("merge", single, tmp_path / f"one-{lam}-{alpha}")
        assert file_bytes(out / f"lambda={lam},alpha={alpha}") == file_bytes(tmp_path / f"one-{lam}-{alpha}")
    assert (out / "sweep.csv").read_text().splitlines()[0] == "parameters.lambda,calibrate.alpha,path,score"


def test_bad_input_is_refused_all_at_once_before_anything_is_written(tmp_path, family):
    cfg, _, _ = _config(tmp_path, family)
    out = tmp_path / "sweep"
    proc = run_cli("sweep", cfg, out, "--set", "parameters.lamda=1,2", "--set", "calibrate.alpha=0.5,x,y",
                   "--set", "parameters.lambda=", "--set", "calibrate.alpha=1", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "given twice" in proc.stderr and "no values" in proc.stderr
    assert not out.exists()
    proc = run_cli("sweep", cfg, out, "--set", "parameters.lamda=1,2", check=False)
    assert "parameters.lamda: not a key of this config" in proc.stderr and "parameters.lambda" in proc.stderr
    # A combination the config refuses is named.
    proc = run_cli("sweep", cfg, out, "--set", "calibrate.alpha=0.5,-1", check=False)
    assert "variant alpha=-1" in proc.stderr and "calibrate.alpha" in proc.stderr and not out.exists()
    proc = run_cli("sweep", cfg, out, "--set", "parameters.lambda=1,1.0", check=False)
    assert "given twice" in proc.stderr and not out.exists()


def test_eval_scores_picks_the_best_and_is_not_rerun_once_recorded(tmp_path, family):
    """The score is the last number the command prints; `best` the highest (--minimize: the
    lowest); a rerun on a finished sweep does not evaluate again; a failing command is named
    with its stderr and the other variants go on."""
    cfg, _, _ = _config(tmp_path, family)
    out = tmp_path / "sweep"
    calls = tmp_path / "calls"
    script = tmp_path / "score.py"
    script.write_text("import sys, pathlib\n"
                      f"pathlib.Path({str(calls)!r}).open('a').write(sys.argv[1] + '\\n')\n"
                      "name = pathlib.Path(sys.argv[1]).name\n"
                      "if 'lambda=0.3' in name: sys.exit('broken model: ' + name)\n"
                      "print('loss 12 then', float(name.split('=')[1]) * 10)\n")
    cmd = f"{sys.executable} {script} {{model}}"
    proc = run_cli("sweep", cfg, out, "--set", "parameters.lambda=0.2,0.3,0.5", "--eval", cmd, "--no-calibrate",
                   check=False)
    assert proc.returncode == 1 and "broken model: lambda=0.3" in proc.stderr
    record = json.loads((out / "sweep.json").read_text())
    assert [v.get("score") for v in record["variants"]] == [2.0, None, 5.0] and record["best"] == "lambda=0.5"
    assert len(calls.read_text().splitlines()) == 3
    proc = run_cli("sweep", cfg, out, "--set", "parameters.lambda=0.2,0.5", "--eval", cmd, "--minimize",
                   "--no-calibrate")
    record = json.loads((out / "sweep.json").read_text())
    assert record["best"] == "lambda=0.2" and len(calls.read_text().splitlines()) == 3  # nothing evaluated again


def test_settings_reach_models_and_methods(tmp_path, family):
    """`models.1.parameters.weight` and `merge_method` are axes too; each variant's manifest
    holds the config with its values set."""
    cfg, _, _ = _config(tmp_path, family)
    out = tmp_path / "sweep"
    run_cli("sweep", cfg, out, "--set", "models.1.parameters.weight=0.5,2", "--set", "merge_method=task_arithmetic,ties",
            "--no-calibrate")
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == ["weight=0.5,merge_method=task_arithmetic", "weight=0.5,merge_method=ties",
                     "weight=2,merge_method=task_arithmetic", "weight=2,merge_method=ties"]
    card = (out / "weight=2,merge_method=ties" / "README.md").read_text()
    assert "ties" in card


def test_the_python_api_sweeps_a_dict_config_and_reports_failures_without_raising(tmp_path, family):
    """`dist_svc.sweep(config, out_dir, sets)`: the report lists the variants; one whose merge is
    refused (here: not finite, lambda 1e39 overflows float32) is in `failed`, named, the other complete."""
    import dist_svc

    base, fts = family(k=2)
    config = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(f)} for f in fts]}
    report = dist_svc.sweep(config, tmp_path / "sweep", ["parameters.lambda=0.5,1e39"], calibrate=False,
                            progress="off")
    assert [v.path for v in report.variants] == ["lambda=0.5", "lambda=1e39"]
    assert [v.path for v in report.failed] == ["lambda=1e39"] and "finite" in report.failed[0].error
    assert dist_svc.status(tmp_path / "sweep" / "lambda=0.5")["state"] == "complete"


# -- shared work: one read of each unit's inputs, one computation per setting of the method ---------

@pytest.mark.parametrize("top, sets", [
    # lambda x alpha on calibrated task arithmetic: one Gram pass and one eigh for all four
    ({}, ["parameters.lambda=0.6,1.3", "calibrate.alpha=0.3,1"]),
    # TIES: density changes the selection (its own passes), lambda only the final scale
    ({"merge_method": "ties", "parameters": {"density": 0.5}},
     ["parameters.density=0.4,0.7", "parameters.lambda=-0.5,1"]),
    # a per-model weight, and calibration on and off, in one batch
    ({"merge_method": "dare_ties", "parameters": {"density": 0.6}},
     ["models.0.parameters.weight=0.5,1", "calibrate.enabled=true,false"]),
    # methods on weights and on task vectors, calibration on its other side
    ({"calibrate": {"side": "row"}, "parameters": {"weight": 1.0, "density": 0.5}},
     ["merge_method=linear,task_arithmetic,ties"]),
], ids=["ta-lambda-alpha", "ties-density-lambda", "dare-weight-calibrate", "methods"])
def test_variants_merged_together_equal_separate_merges_byte_for_byte(tmp_path, family, top, sets):
    cfg, base, fts = _config(tmp_path, family, **top)
    document = yaml.safe_load(cfg.read_text())
    out = tmp_path / "sweep"
    run_cli("sweep", cfg, out, *[arg for s in sets for arg in ("--set", s)])
    record = json.loads((out / "sweep.json").read_text())
    assert len(record["variants"]) == len(list(itertools.product(*[s.split("=")[1].split(",") for s in sets])))
    for n, variant in enumerate(record["variants"]):
        doc = document
        for key, value in variant["settings"].items():
            doc = with_setting(doc, key, value)
        single = tmp_path / f"one-{n}.yaml"
        single.write_text(yaml.safe_dump(doc, sort_keys=False))
        run_cli("merge", single, tmp_path / f"one-{n}")
        assert file_bytes(out / variant["path"]) == file_bytes(tmp_path / f"one-{n}"), variant["path"]


def test_a_sweep_reads_each_input_once_for_all_its_variants(tmp_path, family, monkeypatch):
    """Every block of every input is read as often for six calibrated variants as for one merge
    (counted at the reader), and the six share one eigendecomposition per matrix."""
    import torch

    import dist_svc
    from dist_svc.blocks import BlockReader

    cfg, _, _ = _config(tmp_path, family)
    reads: collections.Counter = collections.Counter()
    read = BlockReader._read

    def counted(self, checkpoint, name, block):
        reads[name] += 1
        return read(self, checkpoint, name, block)

    eighs = []
    eigh = torch.linalg.eigh

    def counted_eigh(matrix, *args, **kwargs):
        eighs.append(tuple(matrix.shape))
        return eigh(matrix, *args, **kwargs)

    monkeypatch.setattr(BlockReader, "_read", counted)
    monkeypatch.setattr(torch.linalg, "eigh", counted_eigh)
    dist_svc.merge(cfg, tmp_path / "one", progress="off")
    one, one_eighs = dict(reads), len(eighs)
    reads.clear()
    eighs.clear()
    report = dist_svc.sweep(cfg, tmp_path / "six", ["parameters.lambda=0.5,1,1.5", "calibrate.alpha=0.3,1"],
                            progress="off")
    assert not report.failed and len(report.variants) == 6
    assert dict(reads) == one and one_eighs > 0 and len(eighs) == one_eighs


def test_a_variant_that_overflows_is_refused_by_name_and_the_others_finish(tmp_path, family):
    """One batch: lambda=1e39 overflows float32 in every tensor; its variant fails with the
    tensor named, the two others are complete and verified."""
    cfg, _, _ = _config(tmp_path, family)
    out = tmp_path / "sweep"
    proc = run_cli("sweep", cfg, out, "--set", "parameters.lambda=0.5,1e39,1", "--no-calibrate", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "lambda=1e39" in proc.stderr and "is not finite" in proc.stderr
    record = json.loads((out / "sweep.json").read_text())
    assert ["error" in v for v in record["variants"]] == [False, True, False]
    for path in ("lambda=0.5", "lambda=1"):
        assert "verified" in run_cli("verify", out / path).stdout
    status = run_cli("status", out / "lambda=1e39", check=False)
    assert status.returncode != 0 and "failed" in status.stdout and "is not finite" in status.stdout


def test_kill_9_mid_sweep_then_rerun_equals_an_uninterrupted_sweep(tmp_path, family):
    from tests.test_resume import SLOW

    base, fts = family(3, arch=SLOW, shards=2)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    sets = ["--set", "parameters.lambda=0.5,1", "--set", "calibrate.alpha=0.4,1", "--shard-size", "1MB"]
    run_cli("sweep", cfg, tmp_path / "reference", *sets)
    out = tmp_path / "resumed"
    kill_mid_run(["sweep", cfg, out, *sets, "--progress", "off"], out / "lambda=0.5,alpha=0.4", 8)
    run_cli("sweep", cfg, out, *sets)
    variants = json.loads((tmp_path / "reference" / "sweep.json").read_text())["variants"]
    assert len(variants) == 4
    for v in variants:
        assert file_bytes(out / v["path"]) == file_bytes(tmp_path / "reference" / v["path"]), v["path"]
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.startswith("sweep.")}
    run_cli("sweep", cfg, out, *sets)  # finished: nothing is written again
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.startswith("sweep.")} == files


def test_every_scale_a_method_declares_multiplies_its_result_last_exactly():
    """`Method.scale`: the method at lambda equals the method at 1 times lambda, bit for bit (what
    lets merges that differ only in it compute the method once)."""
    import torch

    from dist_svc.methods import METHODS
    from dist_svc.methods.base import Where

    torch.manual_seed(0)
    scaled = [m for m in METHODS.values() if m.scale is not None]
    assert {"task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs"} <= {m.name for m in scaled}
    for method in scaled:
        k = 3 if method.most_fine_tunes is None else min(3, method.most_fine_tunes)
        taus = [torch.randn(16, 12) for _ in range(k)]
        params = {p.name: p.default for p in method.shared_params}
        params.update({k_: v for k_, v in method.sample.items() if not method.param(k_).per_model})
        for p in method.model_params:
            value = method.sample.get(p.name, p.default)
            params[p.name] = tuple([value] * (k + 1 if p.scope == "input" else k))
        where = Where("model.layers.0.mlp.up_proj.weight", lambda: torch.arange(16 * 12).view(16, 12), 0)
        for lam in (0.37, -1.5, 3.0):
            got = method.merge([t.clone() for t in taus], {**params, method.scale: lam}, where)
            once = method.merge([t.clone() for t in taus], {**params, method.scale: 1.0}, where) * lam
            assert torch.equal(got, once), (method.name, lam)
