"""The Python API as a user calls it: `dist_svc.merge` with a dict or a file, the executor chosen
by keywords, `status`, `verify` and `dry_run` beside it, and a report that prints short."""

from __future__ import annotations

import yaml
import pytest

import dist_svc
from dist_svc import DistSvcError
from tests.conftest import file_bytes, write_config


def test_a_dict_config_merges_byte_identically_to_its_yaml_file(tmp_path, family):
    base, fts = family(3)
    path = write_config(tmp_path / "m.yaml", base, fts)
    from_file = dist_svc.merge(path, tmp_path / "from-file", shard_size="1MB")
    from_dict = dist_svc.merge(yaml.safe_load(path.read_text()), tmp_path / "from-dict", shard_size="1MB")
    assert from_dict.units_run == from_file.units_run == from_file.units_total
    assert file_bytes(tmp_path / "from-dict") == file_bytes(tmp_path / "from-file")
    assert dist_svc.verify(tmp_path / "from-dict") == []


def test_model_paths_may_be_path_objects_in_a_dict(tmp_path, family):
    base, fts = family(2)
    config = {"merge_method": "task_arithmetic", "base_model": base,
              "models": [{"model": f, "parameters": {"weight": 0.5}} for f in fts]}
    report = dist_svc.merge(config, tmp_path / "out")
    assert report.units_run == report.units_total > 0


def test_a_dict_config_is_validated_as_a_yaml_file_would_be_naming_the_field(tmp_path, family):
    base, fts = family(2)
    config = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [{"model": str(f), "parameters": {"weight": "heavy"}} for f in fts]}
    with pytest.raises(DistSvcError) as from_dict:
        dist_svc.merge(config, tmp_path / "out")
    with pytest.raises(DistSvcError) as from_file:
        dist_svc.merge(write_config(tmp_path / "m.yaml", base, fts, weights=["heavy", "heavy"]), tmp_path / "out")
    assert "models[0].parameters.weight" in str(from_dict.value)
    assert str(from_dict.value).split(": ", 1)[1] == str(from_file.value).split(": ", 1)[1]
    assert not (tmp_path / "out").exists()
    with pytest.raises(DistSvcError, match="a path to a YAML file, a dict"):
        dist_svc.merge(["merge_method", "task_arithmetic"], tmp_path / "out")


def test_executor_keywords_choose_threads_device_and_memory_limit(tmp_path, family):
    base, fts = family(2)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    report = dist_svc.merge(cfg, tmp_path / "out", device="cpu", threads=1, memory_limit="1GiB")
    assert report.executor == "local: up to 1 units at once on cpu, within 1.0 GiB"
    report = dist_svc.merge(cfg, tmp_path / "out2", threads=3, memory_limit=2 * 2**30)
    assert report.executor == "local: up to 3 units at once on cpu, within 2.0 GiB"
    assert file_bytes(tmp_path / "out") == file_bytes(tmp_path / "out2")


def test_an_executor_and_executor_keywords_together_are_refused(tmp_path, family):
    from dist_svc.executors import build_executor

    base, fts = family(2)
    with pytest.raises(DistSvcError, match="not both"):
        dist_svc.merge(write_config(tmp_path / "m.yaml", base, fts), tmp_path / "out",
                       executor=build_executor(threads=1), threads=2)
    assert not (tmp_path / "out").exists()


def test_the_report_prints_as_one_short_line(tmp_path, family):
    base, fts = family(3)
    out = tmp_path / "out"
    report = dist_svc.merge(write_config(tmp_path / "m.yaml", base, fts), out)
    assert len(report.calibration) > 10  # the per-tensor facts are there, not in the repr
    text = repr(report)
    assert "\n" not in text and len(text) < 400, text
    assert f"{report.units_total} tensors" in text and str(out) in text and "KiB" in text
    assert f"{len(report.calibration)} matrices calibrated" in text and "median" in text
    again = repr(dist_svc.merge(write_config(tmp_path / "m.yaml", base, fts), out))
    assert "already complete" in again and len(again) < 400


def test_status_verify_and_dry_run_are_part_of_the_package(tmp_path, family):
    base, fts = family(2)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    out = tmp_path / "out"
    plan, estimate, existing = dist_svc.dry_run(cfg, out)
    assert existing is None and len(plan.units) > 0 and estimate.seconds > 0
    assert not out.exists()
    report = dist_svc.merge(cfg, out)
    info = dist_svc.status(out)
    assert info["state"] == "complete" and info["units_done"] == info["units_total"] == report.units_total
    assert dist_svc.verify(out) == []
    assert {"merge", "status", "verify", "dry_run", "MergeReport"} <= set(dist_svc.__all__)
