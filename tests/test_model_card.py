"""The model card (README.md) a finished merge writes, as mergekit does: front matter, method,
models, the config, and what calibration did; `--no-write-model-card` skips it."""

from __future__ import annotations

import re

import yaml

from dist_svc import merge
from dist_svc.driver import open_output
from tests.conftest import file_bytes, run_cli, write_config


def _front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def test_a_merge_writes_a_card_with_method_models_config_and_the_calibration_it_did(tmp_path, family):
    from mergekit.card import generate_card
    from mergekit.config import MergeConfiguration

    base, fts = family(3)
    cfg = write_config(tmp_path / "m.yaml", base, fts, parameters={"lambda": 0.7})
    report = merge(cfg, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()

    assert _front_matter(card) == {"base_model": [], "tags": ["mergekit", "merge", "dist-svc", "svc"],
                                   "library_name": "transformers"}
    assert f"merge method using {base} as a base." in card and "task_arithmetic" in card
    # The models mergekit 0.1.5's card lists for the same config (in a set's order there; in the
    # config's order here).
    theirs = generate_card(MergeConfiguration.model_validate(yaml.safe_load(cfg.read_text())), cfg.read_text())
    bullets = lambda text: [line for line in text.splitlines() if line.startswith("* ")]  # noqa: E731
    assert bullets(card) == [f"* {f}" for f in fts] and sorted(bullets(card)) == sorted(bullets(theirs))
    assert yaml.safe_load(card.split("```yaml\n")[1].split("```")[0]) == yaml.safe_load(cfg.read_text())
    # The calibration in numbers, as the manifest has them.
    summary = report.calibration_summary()
    manifest, _ = open_output(tmp_path / "out")
    ratios = sorted(u["calibration"]["sigma_before"][0] / u["calibration"]["sigma_after"][0]
                    for u in manifest.units.values() if u.get("calibration"))
    assert summary["matrices"] == len(ratios) > 10
    assert "K = 3 task vectors, alpha = 0.3333 (1/K" in card
    median = float(re.search(r"before / after calibration: ([\d.]+) \(median", card)[1])
    assert abs(median - ratios[len(ratios) // 2]) <= 1e-3 * median  # an odd count: the middle one
    assert f"{summary['matrices']} matrices calibrated" in card


def test_the_card_of_an_uncalibrated_merge_says_so(tmp_path, family):
    base, fts = family(2)
    run_cli("merge", write_config(tmp_path / "m.yaml", base, fts), tmp_path / "out", "--no-calibrate")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "None (turned off)" in card and "svc" not in _front_matter(card)["tags"]


def test_no_write_model_card_skips_it_and_says_nothing_about_it(tmp_path, family):
    base, fts = family(2)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    proc = run_cli("mergekit-yaml", cfg, tmp_path / "out", "--no-write-model-card")
    assert not (tmp_path / "out" / "README.md").exists()
    assert "model-card" not in proc.stderr
    run_cli("mergekit-yaml", cfg, tmp_path / "with", "--write-model-card")
    names = lambda out: {p.name for p in out.iterdir()}  # noqa: E731
    assert names(tmp_path / "with") - names(tmp_path / "out") == {"README.md"}
    assert file_bytes(tmp_path / "with") == file_bytes(tmp_path / "out")


def test_the_card_is_the_same_for_every_run_and_one_the_user_edited_is_kept(tmp_path, family):
    base, fts = family(2)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    run_cli("merge", cfg, tmp_path / "a", "--threads", "1")
    run_cli("merge", cfg, tmp_path / "b", "--threads", "3")
    assert (tmp_path / "a" / "README.md").read_bytes() == (tmp_path / "b" / "README.md").read_bytes()

    card = tmp_path / "a" / "README.md"
    card.write_text("# my model\n")
    next((tmp_path / "a").glob("model-*.safetensors")).unlink()  # damage: the rerun repairs it
    assert "merged" in run_cli("merge", cfg, tmp_path / "a").stdout
    assert card.read_text() == "# my model\n"
    assert "verified" in run_cli("verify", tmp_path / "a").stdout
