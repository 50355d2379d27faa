"""What a person sees: `inspect` (spectra picture and table), `merge --dry-run`, the example configs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dist_svc import merge
from dist_svc.config import load_config
from tests.conftest import run_cli, write_config

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
    assert missing.returncode == 2 and "no calibrated matrix matches" in missing.stderr


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
    assert "resumes a merge with" in run_cli("merge", cfg, tmp_path / "done", "--dry-run").stdout


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_is_valid(path):
    config = load_config(path)
    assert config.k == 3
