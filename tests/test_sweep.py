"""`dist-svc sweep`: every variant is what `dist-svc merge` writes for the config with its values
set, byte for byte; bad input is refused, all of it at once, before anything is written; the
record (sweep.json/csv) and the evaluation are as documented; a rerun resumes."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from tests.conftest import file_bytes, run_cli, write_config


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
