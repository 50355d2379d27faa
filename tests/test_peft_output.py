"""The PEFT-adapter output (`output: {format: peft}`, dist_svc/lowrank.py) as a user meets it:
`--dry-run` prints the adapter merge that runs, the report counts the tensors written, and
`status`, `verify` and `inspect` read the finished adapter, a damaged one and an unfinished one."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors import safe_open

from tests.conftest import run_cli, write_config
from tests.test_lora import peft_family  # noqa: F401  (the fixture: a base and three PEFT adapters)

pytest.importorskip("peft", reason="the adapters are built with PEFT (.[compat])")

ADAPTER = "adapter_model.safetensors"


def adapter_tensors(out_dir) -> dict[str, int]:
    """Every tensor of a written adapter and its bytes, from the file itself."""
    with safe_open(str(out_dir / ADAPTER), "pt") as f:
        return {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()}


@pytest.fixture
def adapter_config(tmp_path, peft_family):  # noqa: F811
    base, adapters, _, _ = peft_family
    return write_config(tmp_path / "m.yaml", base, adapters, parameters={"lambda": 0.7}, output={"format": "peft"})


def test_dry_run_prints_the_adapter_merge_and_the_merge_counts_what_it_writes(tmp_path, adapter_config):
    dry = run_cli("merge", adapter_config, tmp_path / "adapter", "--dry-run").stdout
    assert not (tmp_path / "adapter").exists()
    merged = run_cli("merge", adapter_config, tmp_path / "adapter")
    written = adapter_tensors(tmp_path / "adapter")
    rank = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"]
    # The adapter merge's plan, in the numbers of what it then writes: not the dense plan's.
    assert f"{len(written)} adapter tensors (r = {rank})" in dry, dry
    assert f"{sum(written.values())} bytes" in dry and "SVC in factored form" in dry
    assert "per element" not in dry and "a new merge" in dry
    assert f"merged {len(written)} tensors" in merged.stdout, merged.stdout
    assert "SVC in factored form" in merged.stderr
    again = run_cli("merge", adapter_config, tmp_path / "adapter", "--dry-run").stdout
    assert "already holds this merge" in again
    # Calibration off: the plan line and the dry run say what runs instead.
    plain = run_cli("merge", adapter_config, tmp_path / "plain", "--no-calibrate")
    assert "SVC" not in plain.stderr and "no calibration" in plain.stderr, plain.stderr
    assert "no calibration" in run_cli("merge", adapter_config, tmp_path / "p2", "--no-calibrate", "--dry-run").stdout


def test_status_verify_and_inspect_read_a_finished_adapter_merge(tmp_path, adapter_config):
    run_cli("merge", adapter_config, tmp_path / "adapter")
    written = adapter_tensors(tmp_path / "adapter")
    status = run_cli("status", tmp_path / "adapter").stdout
    assert "complete" in status and f"tensors {len(written)}/{len(written)}" in status, status
    verified = run_cli("verify", tmp_path / "adapter").stdout
    assert "verified" in verified and ADAPTER in verified, verified
    record = json.loads((tmp_path / "adapter" / "dist-svc-adapter-merge.json").read_text())
    proc = run_cli("inspect", tmp_path / "adapter", "--out", tmp_path / "rep")
    table = json.loads((tmp_path / "rep.json").read_text())["matrices"]
    assert [r["tensor"] for r in table] == list(record["calibration"]) and (tmp_path / "rep.png").is_file()
    assert f"{len(table)} calibrated matrices" in proc.stdout
    # Merged without calibration: inspect says what the output holds instead of failing obscurely.
    run_cli("merge", adapter_config, tmp_path / "plain", "--no-calibrate")
    plain = run_cli("inspect", tmp_path / "plain", "--out", tmp_path / "plain-rep", check=False)
    assert plain.returncode == 2 and "merged with calibration off" in plain.stderr, plain.stderr


def test_a_damaged_adapter_output_fails_verify_naming_the_file_and_is_not_taken_for_finished(tmp_path, adapter_config):
    out = tmp_path / "adapter"
    run_cli("merge", adapter_config, out)
    data = bytearray((out / ADAPTER).read_bytes())
    data[-3] ^= 0x40  # a bit of the last tensor's data
    (out / ADAPTER).write_bytes(bytes(data))
    proc = run_cli("verify", out, check=False)
    assert proc.returncode == 1 and ADAPTER in proc.stderr and "checksum" in proc.stderr, proc.stderr
    assert "verified" not in proc.stdout
    rerun = run_cli("merge", adapter_config, out, check=False)
    assert rerun.returncode == 2 and ADAPTER in rerun.stderr and "Traceback" not in rerun.stderr
    assert (out / ADAPTER).read_bytes() == bytes(data)  # never overwritten
    (out / "adapter_config.json").unlink()
    status = run_cli("status", out).stdout
    assert "damaged" in status and "adapter_config.json" in status, status
    missing = run_cli("verify", out, check=False)
    assert missing.returncode == 1 and "adapter_config.json" in missing.stderr


def test_an_unfinished_adapter_output_is_never_verified(tmp_path, adapter_config):
    """A run killed while writing leaves its staging directory beside OUT_DIR (OUT_DIR itself
    appears whole or not at all); adapter files without dist-svc's record are not a finished
    merge either."""
    run_cli("merge", adapter_config, tmp_path / "done")
    dead = 2**22 + 17  # a process id that is not running (above Linux's default pid_max)
    staged = tmp_path / f".adapter.merging-{dead}"
    shutil.copytree(tmp_path / "done", staged)
    (staged / "dist-svc-adapter-merge.json").unlink()  # killed before the record was written
    status = run_cli("status", tmp_path / "adapter").stdout
    assert "stopped" in status, status
    proc = run_cli("verify", tmp_path / "adapter", check=False)
    assert proc.returncode == 1 and "not finished" in proc.stderr and "verified" not in proc.stdout, proc.stderr
    run_cli("merge", adapter_config, tmp_path / "adapter")  # the rerun finishes it and tidies up
    assert not staged.exists() and "verified" in run_cli("verify", tmp_path / "adapter").stdout
    # The adapter's files without the record of the merge that wrote them: not vouched for.
    os.remove(tmp_path / "done" / "dist-svc-adapter-merge.json")
    unrecorded = run_cli("verify", tmp_path / "done", check=False)
    assert unrecorded.returncode == 1 and "dist-svc-adapter-merge.json" in unrecorded.stderr
    assert "verified" not in unrecorded.stdout
