"""What a person sees: `inspect` (spectra picture and table), `merge --dry-run`, the example configs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dist_svc import merge
from dist_svc.config import load_config
from tests.conftest import file_bytes, run_cli, write_config

REPO = Path(__file__).resolve().parent.parent


def test_inspect_writes_a_picture_and_a_table_of_what_calibration_did(tmp_path, family):
    from matplotlib import image  # a dependency of dist-svc
    base, fts = family(3)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    report = merge(cfg, tmp_path / "merged", progress="off")
    before = sorted(p.name for p in (tmp_path / "merged").iterdir())
    proc = run_cli("inspect", tmp_path / "merged", "--out", tmp_path / "rep" / "spectra", "--top", "4")
    assert "Strongest over-accumulation" in proc.stdout
    png = image.imread(tmp_path / "rep" / "spectra.png")
    assert png.shape[0] >= 600 and png.shape[1] >= 1000  # heat map + a row of spectra
    assert png[..., :3].std() > 0.05  # not blank
    table = json.loads((tmp_path / "rep" / "spectra.json").read_text())["matrices"]
    assert {r["tensor"] for r in table} == set(report.calibration)
    rows = list(csv.DictReader(open(tmp_path / "rep" / "spectra.csv")))
    assert len(rows) == len(table)
    # The family's fine-tunes share their strongest direction: the merge holds ~3 copies of each
    # task's projection there (s_1i ~ K), and calibration divides sigma_1 by ~3.
    strongest = max(table, key=lambda r: r["top_ratio"])
    assert all(2.5 < s < 3.5 for s in strongest["overlaps"][0]) and 2.5 < strongest["top_ratio"] < 3.5
    assert len(strongest["overlaps"][0]) == 3
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == before  # OUT_DIR untouched
    chosen = run_cli("inspect", tmp_path / "merged", "--tensors", "*layers.1.*", "--out", tmp_path / "l1")
    assert (tmp_path / "l1.png").is_file() and "wrote" in chosen.stdout
    missing = run_cli("inspect", tmp_path / "merged", "--tensors", "*nothing*", check=False)
    assert missing.returncode == 2 and "no calibrated matrix with a non-zero delta matches" in missing.stderr
    # The whole spectrum, not sigma_1 alone: the shared directions' share of the energy falls.
    assert all(r["shrunk"][1] < r["shrunk"][0] and r["norm_ratio"] < 1 for r in table)
    assert all(len(r["eta_quantiles"]) == 5 and r["eta_quantiles"][0] <= r["eta_quantiles"][4] for r in table)


def test_where_calibration_mostly_amplifies_inspect_says_so(tmp_path, family):
    """An average (lambda = 1/K) holds each task-specific direction once over K: calibration
    with alpha = 1/K grows those back, so most updates grow; the report says so instead of
    calling it over-accumulation undone."""
    base, fts = family(3)
    cfg = write_config(tmp_path / "m.yaml", base, fts, parameters={"lambda": 1 / 3})
    merge(cfg, tmp_path / "avg", progress="off")
    proc = run_cli("inspect", tmp_path / "avg", "--out", tmp_path / "avg-report")
    table = json.loads((tmp_path / "avg-report.json").read_text())["matrices"]
    grew = sum(r["norm_ratio"] > 1 for r in table)
    assert grew > len(table) / 2 and all(r["eta_quantiles"][2] < 1 for r in table)
    assert f"({grew} of {len(table)} grew)" in proc.stdout


def test_a_ties_merge_that_calibration_amplifies_says_so_on_the_page_and_in_the_summary(tmp_path, family):
    """TIES (normalize: true, mergekit's default) is a mean over the fine-tunes that agree on
    each entry's sign: the shared top direction is held ~once and calibration grows the
    task-specific rest, so the updates grow. The printed summary and the page say so, and the
    page's tick labels are plain numbers, panel 3's matrices named."""
    from dist_svc.commands.inspect import figure, overall, spectra_table

    base, fts = family(3)
    cfg = write_config(tmp_path / "m.yaml", base, fts, merge_method="ties",
                       parameters={"density": 0.5, "weight": 1.0})
    merge(cfg, tmp_path / "ties", progress="off")
    proc = run_cli("inspect", tmp_path / "ties", "--out", tmp_path / "rep")
    rows = spectra_table(tmp_path / "ties")
    grew = sum(r["norm_ratio"] > 1 for r in rows)
    assert grew > len(rows) / 2  # what this test is about
    effect = overall(rows)
    assert effect["verdict"].startswith(f"Calibration mostly grew the merged updates: {grew} of {len(rows)}")
    assert effect["verdict"] in proc.stdout and "Strongest over-accumulation" not in proc.stdout
    fig = figure(rows, rows[:3], "ties", effect)
    fig.canvas.draw()
    assert effect["verdict"] in fig.get_suptitle()
    labels = [t.get_text() for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
              for t in axis.get_ticklabels(which="both") if t.get_text()]
    assert not [t for t in labels if "10^" in t or "times" in t or "$" in t], labels
    colorbar = [t.get_text() for t in fig.axes[1].yaxis.get_ticklabels()]
    assert "1" in colorbar and all(float(t) > 0 for t in colorbar if t), colorbar  # plain numbers
    eta_panel = fig.axes[4]  # heat map, colorbar, heat map, colorbar, then eta per matrix
    assert [t.get_text() for t in eta_panel.get_xticklabels()] == [
        f"{r['layer']}.{r['module']}" for r in sorted(rows, key=lambda r: r["norm_ratio"])]
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_inspect_reads_a_merge_on_object_storage(tmp_path, bucket, family):
    base, fts = family(3)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    report = merge(cfg, f"{bucket}/merged", progress="off")
    proc = run_cli("inspect", f"{bucket}/merged", cwd=tmp_path)
    assert not (tmp_path / "s3:").exists() and "wrote merged-spectra.json" in proc.stdout, proc.stdout
    table = json.loads((tmp_path / "merged-spectra.json").read_text())
    assert table["out_dir"] == f"{bucket}/merged" and {r["tensor"] for r in table["matrices"]} == set(report.calibration)


def test_bert_style_modules_keep_their_full_names_and_zero_deltas_are_counted_not_plotted(tmp_path):
    """MiniLM-style names: attention.output.dense, intermediate.dense and output.dense are three
    rows, not one "dense"; a matrix no fine-tune changed is reported as unchanged, never among
    the strongest with an empty panel."""
    import torch

    from dist_svc.commands.demo import write_hf_checkpoint

    gen = torch.Generator().manual_seed(0)
    names = [f"bert.encoder.layer.{i}.{m}.weight" for i in range(2)
             for m in ("attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense")]
    base = {n: torch.randn(16, 16, generator=gen) for n in names}
    write_hf_checkpoint(tmp_path / "base", base)
    for k in range(2):
        ft = {n: t + (0 if "query" in n else 0.1) * torch.randn(16, 16, generator=gen) for n, t in base.items()}
        write_hf_checkpoint(tmp_path / f"ft-{k}", ft)
    cfg = write_config(tmp_path / "m.yaml", tmp_path / "base", [tmp_path / "ft-0", tmp_path / "ft-1"])
    merge(cfg, tmp_path / "merged-0.2", progress="off")
    proc = run_cli("inspect", tmp_path / "merged-0.2", cwd=tmp_path)
    # OUT_DIR's dots are kept: merged-0.2-spectra.png, not merged-0.png
    assert {p.name for p in tmp_path.glob("merged-0.2-spectra.*")} == {
        "merged-0.2-spectra.png", "merged-0.2-spectra.json", "merged-0.2-spectra.csv"}
    table = json.loads((tmp_path / "merged-0.2-spectra.json").read_text())["matrices"]
    assert {r["module"] for r in table} == {"attention.self.query", "attention.output.dense", "intermediate.dense",
                                           "output.dense"}
    assert "2 of them unchanged by the fine-tunes" in proc.stdout
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  bert.")]
    assert listed and not any("query" in name for name in listed)


def test_dry_run_prints_the_plan_in_numbers_and_writes_nothing(tmp_path, family):
    base, fts = family(3)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    out = tmp_path / "never"
    proc = run_cli("merge", cfg, out, "--dry-run")
    assert not out.exists()
    text = proc.stdout
    for word in ("tensors", "read", "write", "memory", "per worker", "time"):
        assert word in text, text
    from dist_svc.driver import dry_run
    from dist_svc.storage import open_checkpoint

    plan, est, existing = dry_run(cfg, out)
    inputs = [open_checkpoint(p) for p in (base, *fts)]
    assert est.read_bytes == sum(i.tensors[n].nbytes for i in inputs for n in i.tensors)
    assert est.write_bytes == plan.total_bytes and existing is None and est.seconds > 0
    assert est.worker_memory_bytes > 0
    merge(cfg, tmp_path / "done", progress="off")
    assert "already complete" in run_cli("merge", cfg, tmp_path / "done", "--dry-run").stdout


def test_the_dry_run_probes_in_proportion_to_the_job_and_not_at_all_when_it_is_done(tmp_path, family):
    """Every read probe together reads at most PROBE_SHARE of what the merge reads (a dry run
    of a small merge must not take longer than the merge); a resumed merge is estimated for the
    tensors left, a finished one is not probed."""
    from dist_svc.estimate import PROBE_SHARE
    from dist_svc.commands.demo import TinyLlama
    from dist_svc.driver import dry_run

    arch = TinyLlama(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
    base, fts = family(3, arch=arch)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    plan, est, existing = dry_run(cfg, tmp_path / "out")
    assert existing is None and est.tensors == len(plan.units) and est.read_bytes > 1 << 20
    assert 0 < est.probe_bytes <= PROBE_SHARE * est.read_bytes, (est.probe_bytes, est.read_bytes)
    assert est.latency > 0 and est.read_rate > 0 and est.seconds > 0
    merge(cfg, tmp_path / "out", progress="off")
    plan, est, existing = dry_run(cfg, tmp_path / "out")
    assert existing["units_done"] == len(plan.units) and est.tensors == 0 and est.probe_bytes == 0
    assert est.seconds == 0


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_is_valid(path):
    config = load_config(path)
    assert config.k == 3


def test_demo_compares_what_calibration_does_to_each_method(tmp_path):
    """Task arithmetic counts the family's shared update K times (calibration shrinks it);
    an average holds each task's own update 1/K times (calibration grows it); SLERP of one
    fine-tune with its base (K = 1, alpha = 1) is left as it is."""
    proc = run_cli("demo", tmp_path / "demo", "--layers", "2", "--methods", "task_arithmetic,linear,slerp,ties")
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[-4:]}
    assert set(rows) == {"task_arithmetic", "linear", "slerp", "ties"}
    norm = {m: float(r[2]) for m, r in rows.items()}
    assert norm["task_arithmetic"] < 0.7 and norm["linear"] > 1.3 and norm["slerp"] == 1.0
    assert int(rows["task_arithmetic"][3][:-1]) > 80 and rows["linear"][3] == "0%"  # energy held more than once


def test_the_config_the_demo_writes_reruns_on_its_output_as_the_finished_merge(tmp_path):
    """The demo's merge.yaml describes the merge it made (its shard size included): `merge` on
    it and the demo's output is a no-op, and its dry run says there is nothing to do."""
    demo = tmp_path / "demo"
    run_cli("demo", demo, "--layers", "1", "-k", "2", "--methods", "ties")
    before = file_bytes(demo / "merged")
    for config, out in (("merge.yaml", "merged"), ("merge-ties.yaml", "merged-ties")):
        proc = run_cli("merge", demo / config, demo / out)
        assert "this merge is already complete" in proc.stdout, proc.stdout + proc.stderr
        dry = run_cli("merge", demo / config, demo / out, "--dry-run")
        assert "already complete" in dry.stdout and "nothing to do" in dry.stdout, dry.stdout + dry.stderr
    assert file_bytes(demo / "merged") == before

