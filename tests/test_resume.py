"""Resume: kill -9 at any point, rerun the same command, get the uninterrupted run's bytes."""

from __future__ import annotations

import json
import time

import pytest
import torch

from dist_svc import DistSvcError, merge
from dist_svc.manifest import Manifest
from dist_svc.commands.demo import TinyLlama
from tests.conftest import file_bytes, kill_mid_run, run_cli, stored_at, units_done, write_config

# Big enough (~0.1 s of work per matrix) that a kill lands mid-merge, small enough for CI.
SLOW = TinyLlama(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                 num_attention_heads=4, num_key_value_heads=2)



def _start_and_kill(cfg, out_dir, at_least: int) -> None:
    """Start `dist-svc merge`, SIGKILL it once `at_least` more units are recorded, mid-merge."""
    kill_mid_run(["merge", cfg, out_dir, "--shard-size", "1MB", "--progress", "off"], out_dir, at_least)


@pytest.fixture(scope="module")
def slow_merge(tmp_path_factory):
    """The config of a merge of a SLOW family, made once for this module (no test changes its inputs)."""
    from dist_svc.commands.demo import make_family

    root = tmp_path_factory.mktemp("slow-family")
    base, fts = make_family(root, k=3, arch=SLOW, dtype=torch.float32, shards=2)
    return write_config(root / "m.yaml", base, fts)


@pytest.fixture(scope="module")
def uninterrupted(slow_merge):
    """The bytes of `slow_merge` merged without interruption."""
    reference = slow_merge.parent / "uninterrupted"
    run_cli("merge", slow_merge, reference, "--shard-size", "1MB")
    return file_bytes(reference)


def test_kill_9_mid_merge_then_rerun_is_byte_identical_and_redoes_only_unfinished_units(tmp_path, slow_merge,
                                                                                       uninterrupted):
    out = tmp_path / "resumed"
    _start_and_kill(slow_merge, out, at_least=5)
    first_done, total = units_done(out)
    status = run_cli("status", out).stdout
    assert "stopped" in status and f"tensors {first_done}/{total}" in status
    assert list(out.glob("*.partial"))  # work in progress is never under a final name

    _start_and_kill(slow_merge, out, at_least=10)  # a second interruption, later on
    second_done, _ = units_done(out)
    assert second_done >= first_done + 10
    sealed_before = {p.name for p in out.glob("model-*.safetensors")}

    result = run_cli("merge", slow_merge, out, "--shard-size", "1MB", "--progress", "log")
    assert f"merged {total - second_done} tensors" in result.stdout
    assert f"{second_done} already done by an earlier run" in result.stdout
    assert file_bytes(out) == uninterrupted
    assert sealed_before <= {p.name for p in out.glob("model-*.safetensors")}
    assert "complete" in run_cli("status", out).stdout


def test_rerun_of_a_finished_merge_changes_nothing(tmp_path, family):
    base, fts = family(2)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    run_cli("merge", cfg, tmp_path / "out")
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "out").iterdir()}
    result = run_cli("merge", cfg, tmp_path / "out")
    assert "already complete" in result.stdout
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "out").iterdir()} == before


@pytest.mark.parametrize("change, mentioned", [
    ({"parameters": {"lambda": 0.5}}, "lambda"),
    ({"calibrate": False}, "calibrate.enabled"),
])
def test_a_different_config_for_the_same_out_dir_is_refused_and_nothing_is_touched(tmp_path, family, change, mentioned):
    base, fts = family(2)
    run_cli("merge", write_config(tmp_path / "a.yaml", base, fts), tmp_path / "out")
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "out").iterdir()}
    result = run_cli("merge", write_config(tmp_path / "b.yaml", base, fts, **change), tmp_path / "out", check=False)
    assert result.returncode == 2
    assert mentioned in result.stderr and "Nothing was changed" in result.stderr
    assert "Traceback" not in result.stderr
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "out").iterdir()} == before


def test_every_parameter_of_every_model_is_part_of_the_merge_it_resumes(tmp_path, family):
    """A per-model parameter with a plain value (breadcrumbs' gamma of the second model) decides
    the bytes as much as a global one: changed, the rerun is refused, naming it."""
    base, fts = family(3)
    models = [{"weight": 1.0, "density": 0.8, "gamma": 0.02}, {"weight": 0.5, "density": 0.8, "gamma": 0.02}]
    cfg = write_config(tmp_path / "a.yaml", base, fts[:2], merge_method="breadcrumbs")
    import yaml

    raw = yaml.safe_load(cfg.read_text())
    for entry, params in zip(raw["models"], models):
        entry["parameters"] = params
    cfg.write_text(yaml.safe_dump(raw))
    run_cli("merge", cfg, tmp_path / "out")
    raw["models"][1]["parameters"]["gamma"] = 0.05
    cfg.write_text(yaml.safe_dump(raw))
    result = run_cli("merge", cfg, tmp_path / "out", check=False)
    assert result.returncode == 2 and "'sources.models[1].parameters.gamma' was 0.02, now 0.05" in result.stderr


def test_changed_inputs_for_the_same_out_dir_are_refused(tmp_path, family):
    base, fts = family(2)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    out = tmp_path / "out"
    merge(cfg, out, progress="off")
    before = file_bytes(out)
    # The same tensors re-saved in place (as a re-download or a conversion would): the file's
    # modification time changes, so the finished merge no longer describes these inputs.
    ft = fts[0] / "model.safetensors"
    data = ft.read_bytes()
    time.sleep(0.01)
    ft.write_bytes(data)
    with pytest.raises(DistSvcError, match="files of input .*ft-1 changed"):
        merge(cfg, out, progress="off")
    assert file_bytes(out) == before


def test_a_non_empty_directory_that_is_not_a_merge_is_refused(tmp_path, family):
    base, fts = family(1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.bin").write_bytes(b"keep me")
    result = run_cli("merge", write_config(tmp_path / "m.yaml", base, fts), out, check=False)
    assert result.returncode == 2 and "not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["precious.bin"]


def test_corrupted_bytes_of_a_finished_unit_are_found_and_recomputed_on_resume(tmp_path, slow_merge, uninterrupted):
    out = tmp_path / "resumed"
    _start_and_kill(slow_merge, out, at_least=3)
    # A recorded tensor in a shard not yet sealed (sealed shards: verify's test below).
    recorded = list(Manifest.load(out).recorded)
    name = next((n for n in recorded if stored_at(out, n)[0].name.endswith(".partial")), None)
    if name is None:
        pytest.skip("every recorded tensor's shard was already sealed when the merge was killed")
    path, offset, nbytes, _ = stored_at(out, name)
    with open(path, "r+b") as f:  # flip one byte in the middle of a recorded tensor
        f.seek(offset + nbytes // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    run_cli("merge", slow_merge, out, "--shard-size", "1MB")
    assert file_bytes(out) == uninterrupted


def test_verify_finds_a_flipped_byte_and_a_deleted_shard_is_merged_again_alone(tmp_path, family):
    base, fts = family(3)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    out = tmp_path / "out"
    run_cli("merge", cfg, out, "--shard-size", "40KB")
    good = file_bytes(out)
    assert "tensors match their checksums" in run_cli("verify", out).stdout

    manifest = json.loads((out / "dist-svc-manifest.json").read_text())
    name = next(n for n, u in manifest["units"].items() if u["nbytes"] > 64)
    shard, offset, _, shard_tensors = stored_at(out, name)
    raw = bytearray(shard.read_bytes())
    raw[offset + 5] ^= 0x01
    shard.write_bytes(bytes(raw))
    result = run_cli("verify", out, check=False)
    assert result.returncode == 1 and name in result.stderr and "corrupted" in result.stderr

    shard.unlink()  # as the message says: delete the damaged shard, rerun the same command
    assert "missing" in run_cli("verify", out, check=False).stderr
    rerun = run_cli("merge", cfg, out, "--shard-size", "40KB")
    assert f"merged {len(shard_tensors)} tensors" in rerun.stdout
    assert file_bytes(out) == good
    assert run_cli("verify", out).returncode == 0


def test_a_resumed_merge_shows_progress_over_what_is_left_not_what_an_earlier_run_did(tmp_path, slow_merge):
    """The largest tensors run first: a merge killed after a third of its tensors has done most
    of its bytes. Its rerun's bar starts at 0% with the earlier tensors counted, and says 100%
    only with every tensor done (it said 96% at the start, 100% with a dozen tensors left)."""
    import re

    out = tmp_path / "out"
    _start_and_kill(slow_merge, out, at_least=20)
    done, total = units_done(out)
    stderr = run_cli("merge", slow_merge, out, "--shard-size", "1MB", "--progress", "bar").stderr
    frames = [(int(pct), int(n)) for pct, n in
              re.findall(rf"merge:\s+(\d+)%\|[^\r\n]*?(\d+)/{total} tensors \({done} done earlier\)", stderr)]
    assert frames and frames[0] == (0, done), stderr
    assert frames[-1] == (100, total)
    assert all(n == total for pct, n in frames if pct == 100), frames
    assert [n for _, n in frames] == sorted(n for _, n in frames)
