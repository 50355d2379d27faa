"""A hostile user: kills at named points, hand-edited manifests, crafted headers, full and
read-only disks, damaged and half-finished outputs. Whatever happens, a rerun of the same
command gives the uninterrupted run's bytes, nothing finished is lost, `verify` never passes
something incomplete, and every refusal is one paragraph without a traceback.

Kills are placed by a `sitecustomize` module that the merge subprocess imports at start-up (this
file writes it): `DIST_SVC_TEST_KILL_AT` names the call to die at, so a kill lands at an exact
point of the driver, not after a sleep.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_svc import DistSvcError, merge
from dist_svc.commands.convert import convert
from dist_svc.commands.demo import write_hf_checkpoint
from dist_svc.driver import verify
from tests.conftest import file_bytes, run_cli, run_cli_here, units_done, write_config

KILL_HOOK = '''
import fnmatch, os, signal

_spec = os.environ.get("DIST_SVC_TEST_KILL_AT")
if _spec:
    _what, _rest = _spec.split(":", 1)
    _count = [0]

    def _die():
        os.kill(os.getpid(), signal.SIGKILL)

    if _what == "replace":  # replace:GLOB:N:before|after -- the Nth rename onto a name matching GLOB
        _glob, _nth, _when = _rest.rsplit(":", 2)
        _replace = os.replace

        def replace(src, dst, *a, **k):
            if fnmatch.fnmatch(os.path.basename(str(dst)), _glob):
                _count[0] += 1
                if _count[0] == int(_nth) and _when == "before":
                    _die()
                _replace(src, dst, *a, **k)
                if _count[0] == int(_nth):
                    _die()
                return
            _replace(src, dst, *a, **k)

        os.replace = replace
    elif _what == "pwrite":  # pwrite:N -- in the middle of the Nth positional write (tensor bytes)
        _pwrite = os.pwrite

        def pwrite(fd, data, offset):
            _count[0] += 1
            if _count[0] == int(_rest):
                _pwrite(fd, bytes(memoryview(data)[: len(memoryview(data)) // 2]), offset)
                _die()
            return _pwrite(fd, data, offset)

        os.pwrite = pwrite
    elif _what == "write":  # write:N -- in the middle of the Nth append to the manifest's journal
        _write = os.write

        def write(fd, data):
            _count[0] += 1
            if _count[0] == int(_rest):
                _write(fd, bytes(memoryview(data)[: len(memoryview(data)) // 2]))
                _die()
            return _write(fd, data)

        os.write = write
    elif _what == "fdatasync":  # fdatasync:N -- before the Nth fdatasync (of a shard or the journal)
        _fdatasync = os.fdatasync

        def fdatasync(fd):
            _count[0] += 1
            if _count[0] == int(_rest):
                _die()
            return _fdatasync(fd)

        os.fdatasync = fdatasync
    elif _what == "method":  # method:NAME:N -- the Nth call of merge method NAME raises (a bug in it)
        import dataclasses

        from dist_svc.methods import METHODS

        _name, _nth = _rest.rsplit(":", 1)
        _method = METHODS[_name]

        def _buggy(tensors, p, where, _inner=_method.fn):
            _count[0] += 1
            if _count[0] == int(_nth):
                raise RuntimeError("an injected bug")
            return _inner(tensors, p, where)

        METHODS[_name] = dataclasses.replace(_method, fn=_buggy)
'''


@pytest.fixture(scope="module")
def hook_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("kill-hook")
    (d / "sitecustomize.py").write_text(KILL_HOOK)
    return d


def hooked_merge(hook_dir: Path, cfg: Path, out: Path, kill_at: str, *args) -> subprocess.CompletedProcess:
    """Run `dist-svc merge` with the hook's fault at `kill_at`."""
    env = dict(os.environ, DIST_SVC_TEST_KILL_AT=kill_at,
               PYTHONPATH=os.pathsep.join([str(hook_dir), os.environ.get("PYTHONPATH", ""),
                                           str(Path(__file__).resolve().parent.parent)]))
    return subprocess.run([sys.executable, "-m", "dist_svc.cli", "merge", str(cfg), str(out), "--progress", "off",
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=600)


def killed_merge(hook_dir: Path, cfg: Path, out: Path, kill_at: str, *args) -> int:
    """Run `dist-svc merge` with a kill at `kill_at`; returns its exit status (-9 if killed)."""
    return hooked_merge(hook_dir, cfg, out, kill_at, *args).returncode


def refused(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def _uninterrupted(tmp_path_factory):
    """The inputs, config and uninterrupted merge behind `merged`, made once for this module:
    no test changes these inputs (those that alter inputs make a family of their own)."""
    from dist_svc.commands.demo import make_family
    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("hostile-family")
    base, fts = make_family(root, k=3, arch=TINY, dtype=torch.float32, shards=3, seed=0)
    cfg = write_config(root / "m.yaml", base, fts)
    run_cli("merge", cfg, root / "reference", "--shard-size", "40KB")
    return cfg, root / "reference"


@pytest.fixture
def merged(tmp_path, _uninterrupted):
    """A config and the bytes of its uninterrupted merge (4 shards of 40 KB); that finished merge
    is at tmp_path / "reference", this test's own copy (mtimes kept, as the manifest records
    them: a finished merge, not a changed one)."""
    import shutil

    cfg, finished = _uninterrupted
    shutil.copytree(finished, tmp_path / "reference")
    return cfg, file_bytes(tmp_path / "reference")


def shard_count(reference: dict[str, bytes]) -> int:
    return sum(1 for name in reference if name.startswith("model-") and name.endswith(".safetensors"))


# -- kills at named points -----------------------------------------------------------------------

@pytest.mark.parametrize("point", [
    "last-seal",  # every unit recorded, the last shard not yet renamed from .partial
    "first-manifest-save",  # the manifest's temp file written, not yet renamed
    "after-a-seal",  # a shard renamed, its successor not yet
    "index",  # every shard sealed, the index not yet written
    "side-file",  # the index written, config.json not yet
    "mid-write",  # in the middle of a tensor's bytes
    "torn-journal",  # in the middle of appending records to the manifest's journal
    "before-sync",  # records appended, not yet synced
])
def test_a_kill_at_any_named_point_then_a_rerun_gives_the_uninterrupted_bytes(tmp_path, merged, hook_dir, point):
    cfg, reference = merged
    n = shard_count(reference)
    kill_at = {"last-seal": f"replace:model-*-of-*.safetensors:{n}:before",
               "first-manifest-save": "replace:dist-svc-manifest.json:1:before",
               "after-a-seal": "replace:model-*-of-*.safetensors:2:after",
               "index": "replace:model.safetensors.index.json:1:before",
               "side-file": "replace:config.json:1:before",
               "mid-write": "pwrite:7",
               "torn-journal": "write:2",
               "before-sync": "fdatasync:3"}[point]
    out = tmp_path / "out"
    assert killed_merge(hook_dir, cfg, out, kill_at, "--shard-size", "40KB") == -9
    if point in ("last-seal", "index", "side-file"):
        done, total = units_done(out)
        assert done == total  # every unit recorded: only sealing or finishing was cut short
        assert verify(out)  # never "verified" while anything is missing
        assert run_cli("verify", out, check=False).returncode == 1
    result = run_cli("merge", cfg, out, "--shard-size", "40KB")
    assert "already complete" not in result.stdout
    assert file_bytes(out) == reference
    assert verify(out) == []
    assert "complete" in run_cli("status", out).stdout


def test_a_method_that_raises_stops_the_merge_in_one_paragraph_and_status_says_it_failed(tmp_path, merged, hook_dir):
    """Any exception in a worker (here a method's, the 4th tensor) ends the run with one paragraph
    naming the tensor and the method; `status` does not call the output fine: "failed", N of M,
    the error and what to do, exit 1 (a stopped merge still exits 0); the rerun finishes it."""
    cfg, reference = merged
    out = tmp_path / "out"
    result = hooked_merge(hook_dir, cfg, out, "method:task_arithmetic:4", "--shard-size", "40KB", "--threads", "1")
    stderr = refused(result, "tensor '", "with task_arithmetic failed", "RuntimeError: an injected bug")
    assert "Traceback" not in stderr
    done, total = units_done(out)
    assert 0 < done < total
    status = run_cli("status", out, check=False)
    assert status.returncode == 1, status.stdout
    assert f"{out}: failed" in status.stdout and f"tensors {done}/{total}" in status.stdout
    assert "rerun the same `dist-svc merge` command" in status.stdout and "an injected bug" in status.stdout
    check = run_cli("verify", out, check=False)
    assert check.returncode == 1 and "its last run failed" in check.stderr
    run_cli("merge", cfg, out, "--shard-size", "40KB")
    assert file_bytes(out) == reference and verify(out) == []
    assert run_cli("status", out).stdout.startswith(f"{out}: complete")


def test_a_randomised_kill_and_rerun_loop_ends_byte_identical(tmp_path, merged, hook_dir):
    cfg, reference = merged
    out = tmp_path / "out"
    rng = random.Random(12)
    kills = 0
    while kills < 12:  # each run killed at a random early point of what is left, until one finishes
        point = rng.choice([f"pwrite:{rng.randint(1, 4)}", "write:1", "fdatasync:1",
                            f"replace:model-*-of-*.safetensors:1:{rng.choice(['before', 'after'])}",
                            f"replace:*dist-svc-manifest.json*:1:{rng.choice(['before', 'after'])}"])
        if killed_merge(hook_dir, cfg, out, point, "--shard-size", "40KB") != -9:
            break
        kills += 1
    assert kills >= 3, kills  # really interrupted, several times
    run_cli("merge", cfg, out, "--shard-size", "40KB")
    assert file_bytes(out) == reference and verify(out) == []


def test_a_kill_between_keeping_the_manifests_copy_and_replacing_it_leaves_nothing_behind(tmp_path, merged, hook_dir):
    """Killed after the snapshot's copy is linked, before the new snapshot is renamed over it:
    the copy and the snapshot are then one file, and the next save's rename of a link onto it does
    nothing (POSIX), which left `..dist-svc-manifest.json.prev.tmp` behind."""
    cfg, reference = merged
    out = tmp_path / "out"
    assert killed_merge(hook_dir, cfg, out, "replace:dist-svc-manifest.json:2:before", "--shard-size", "40KB") == -9
    run_cli("merge", cfg, out, "--shard-size", "40KB")
    assert file_bytes(out) == reference and verify(out) == []
    assert sorted(p.name for p in out.iterdir()) == sorted([*reference, "README.md", "dist-svc-manifest.json",
                                                            ".dist-svc-manifest.json.prev"])


# -- hand-edited and damaged manifests and outputs ---------------------------------------------

def test_a_forged_every_unit_done_manifest_is_caught_by_the_checksums(tmp_path, merged, hook_dir):
    cfg, reference = merged
    out = tmp_path / "out"
    assert killed_merge(hook_dir, cfg, out, "pwrite:10", "--shard-size", "40KB") == -9
    manifest_path = out / "dist-svc-manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for unit in manifest["units"].values():
        if not unit["done"]:
            unit.update(done=True, checksum="blake3:" + hashlib.sha256(b"forged").hexdigest())
    manifest_path.write_text(json.dumps(manifest))
    run_cli("merge", cfg, out, "--shard-size", "40KB")
    assert file_bytes(out) == reference and verify(out) == []


def append_to_journal(out: Path, record) -> None:
    """A journal line with a valid CRC, as the manifest writes them, in the current generation's
    journal: what a hand edit (or a bug) could leave."""
    import zlib

    generation = json.loads((out / "dist-svc-manifest.json").read_text())["generation"]
    body = json.dumps(record, separators=(",", ":")).encode()
    with open(out / f".dist-svc-manifest.{generation}.journal", "ab") as f:
        f.write(b"%08x %s\n" % (zlib.crc32(body), body))


JOURNAL_DIGEST = "blake3:" + "ab" * 32


@pytest.mark.parametrize("record", [
    {"unit": "lm_head.weight", "checksum": JOURNAL_DIGEST, "seconds": "slow", "calibration": None},
    {"unit": "lm_head.weight", "checksum": JOURNAL_DIGEST, "seconds": 0.1, "calibration": None, "nbytes": "many"},
    {"unit": "lm_head.weight", "checksum": JOURNAL_DIGEST, "seconds": 0.1, "calibration": [1, 2]},
])
def test_a_journal_record_with_a_valid_crc_but_wrong_types_is_damage_not_a_crash(tmp_path, merged, record):
    """A record is checked as strictly as the snapshot: one that is not what the manifest writes
    is ignored as a line whose CRC fails is (its effect is lost: at worst a unit runs again)."""
    cfg, reference = merged
    out = tmp_path / "reference"
    append_to_journal(out, record)
    for command in ("status", "verify"):
        result = run_cli(command, out, check=False)
        assert "Traceback" not in result.stderr, result.stderr
    run_cli("merge", cfg, out, "--shard-size", "40KB")
    assert file_bytes(out) == reference and verify(out) == []
    assert "complete" in run_cli("status", out).stdout


def test_a_valid_reset_record_in_a_finished_merges_journal_undoes_complete_and_the_rerun_repairs_it(
        tmp_path, merged):
    """"complete" means every unit recorded: status, verify and the rerun's fast path agree with
    the records, not with a flag the journal has overridden."""
    cfg, reference = merged
    out = tmp_path / "reference"
    names = list(json.loads((out / "dist-svc-manifest.json").read_text())["units"])[:3]
    append_to_journal(out, {"reset": names})
    total = units_done(out)[1]
    status = run_cli("status", out).stdout
    assert "complete" not in status and f"tensors {total - 3}/{total}" in status
    assert any("not finished" in p for p in verify(out))
    result = run_cli("merge", cfg, out, "--shard-size", "40KB")
    assert "already complete" not in result.stdout
    assert file_bytes(out) == reference and verify(out) == []
    assert "complete" in run_cli("status", out).stdout and units_done(out)[0] == units_done(out)[1]


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.pop("fingerprint"), "'fingerprint' is missing"),
    (lambda m: m.pop("units"), "'units' is missing"),
    (lambda m: next(iter(m["units"].values())).pop("done"), "lacks one of"),
    (lambda m: m.update(units=[]), "'units' is missing or not a dict"),
])
def test_a_manifest_missing_keys_is_named_and_the_previous_copy_resumes(tmp_path, merged, edit, needle):
    cfg, reference = merged
    out = tmp_path / "reference"  # the finished merge of the fixture
    manifest = json.loads((out / "dist-svc-manifest.json").read_text())
    edit(manifest)
    (out / "dist-svc-manifest.json").write_text(json.dumps(manifest))
    result = run_cli("verify", out, check=False)
    assert result.returncode == 1 and needle in result.stderr and "Traceback" not in result.stderr
    assert "warning" in run_cli("status", out).stdout
    run_cli("merge", cfg, out, "--shard-size", "40KB")  # repairs the manifest from its previous copy
    assert verify(out) == [] and file_bytes(out) == reference
    (out / ".dist-svc-manifest.json.prev").write_text("{")  # both copies gone: start over, said clearly
    (out / "dist-svc-manifest.json").write_text("not json")
    refused(run_cli("status", out, check=False), "damaged", "delete")


def test_a_finished_merge_of_an_earlier_manifest_format_is_refused_untouched_and_still_converts(tmp_path, merged):
    """A manifest of another format is not damage: no fallback to its copy (of that format too),
    every command refuses in one paragraph and changes nothing, and the tensors stay usable."""
    cfg, reference = merged
    out = tmp_path / "reference"
    for name in ("dist-svc-manifest.json", ".dist-svc-manifest.json.prev"):
        manifest = json.loads((out / name).read_text())
        manifest["format"] = 3  # bare sha256 per unit, as that format recorded
        for unit in manifest["units"].values():
            unit["sha256"] = (unit.pop("checksum") or "").partition(":")[2] or None
        (out / name).write_text(json.dumps(manifest))
    before = file_bytes(out)
    for command in (("status", out), ("verify", out), ("merge", cfg, out, "--shard-size", "40KB")):
        refused(run_cli(*command, check=False), "format 3", "reads format 4", "Nothing was changed")
    assert file_bytes(out) == before
    convert(out, tmp_path / "copy", progress="off")

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        return {k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(shard).items()}

    original, copy = tensors(out), tensors(tmp_path / "copy")
    assert original.keys() == copy.keys() and all(torch.equal(original[k], copy[k]) for k in original)


@pytest.mark.parametrize("lost", ["model.safetensors.index.json", "config.json", "tokenizer.json", "shard"])
def test_a_finished_merge_that_lost_a_file_is_restored_by_a_rerun(tmp_path, merged, lost):
    cfg, reference = merged
    out = tmp_path / "reference"
    shards = sorted(n for n in reference if n.startswith("model-"))
    victim = out / (lost if lost != "shard" else shards[1])
    victim.unlink()
    assert any(str(victim) in p for p in verify(out))
    assert "damaged" in run_cli("status", out).stdout
    result = run_cli("merge", cfg, out, "--shard-size", "40KB")
    assert "already complete" not in result.stdout
    assert file_bytes(out) == reference and verify(out) == []


def flip_bytes_keeping_the_size(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data) - 48):  # in the last tensor's bytes
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_finished_shard_whose_bytes_changed_is_not_complete_and_the_rerun_repairs_it(tmp_path, merged):
    """The no-op rerun's fast path does not trust what `verify` refuses: it compares each file's
    size and mtime with those recorded when the merge completed, and a changed shard's tensors
    are checked against their checksums and merged again."""
    cfg, reference = merged
    out = tmp_path / "reference"
    shard = sorted(n for n in reference if n.startswith("model-"))[1]
    flip_bytes_keeping_the_size(out / shard)
    assert any("does not match its checksum" in p for p in verify(out))
    assert "damaged" in run_cli("status", out).stdout
    result = run_cli("merge", cfg, out, "--shard-size", "40KB", "--progress", "log")
    assert "already complete" not in result.stdout and "merged 1 tensors" in result.stdout
    assert file_bytes(out) == reference and verify(out) == []
    assert "already complete" in run_cli("merge", cfg, out, "--shard-size", "40KB").stdout
    os.utime(out / shard)  # touched, bytes unchanged: checked once more, nothing merged again
    result = run_cli("merge", cfg, out, "--shard-size", "40KB")
    assert "merged 0 tensors" in result.stdout and file_bytes(out) == reference
    assert "already complete" in run_cli("merge", cfg, out, "--shard-size", "40KB").stdout


def test_a_finished_zarr_store_whose_chunk_changed_is_repaired_by_the_rerun(tmp_path, family):
    base, fts = family(2)
    cfg = write_config(tmp_path / "m.yaml", base, fts, calibrate=False)
    out = tmp_path / "out.zarr"
    merge(cfg, out, progress="off")
    reference = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and "dist-svc" not in p.name}
    chunk = next(p for p in sorted((out / "lm_head.weight" / "c").rglob("*")) if p.is_file())
    flip_bytes_keeping_the_size(chunk)
    assert verify(out)
    assert not merge(cfg, out, progress="off").already_complete
    assert {p: p.read_bytes() for p in reference} == reference and verify(out) == []
    assert merge(cfg, out, progress="off").already_complete


def test_a_changed_base_config_json_is_a_changed_input(tmp_path, family):
    base, fts = family(2)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    merge(cfg, tmp_path / "out", progress="off")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(dict(config, rope_theta=500000.0)))
    with pytest.raises(DistSvcError, match="files of input .*base changed"):
        merge(cfg, tmp_path / "out", progress="off")


# -- convert and readers: nothing incomplete is "verified" -----------------------------------------

def test_convert_refuses_incomplete_and_altered_sources(tmp_path, merged, hook_dir, family):
    cfg, _ = merged
    # A half-finished safetensors merge (sealed shards and .partial ones).
    half = tmp_path / "half"
    assert killed_merge(hook_dir, cfg, half, "replace:model-*-of-*.safetensors:2:after", "--shard-size", "40KB") == -9
    refused(run_cli("convert", half, tmp_path / "x.zarr", check=False), "not finished")
    # A half-finished zarr merge (arrays created, some without chunks).
    half_z = tmp_path / "half.zarr"  # killed before the manifest records the written arrays
    assert killed_merge(hook_dir, cfg, half_z, "replace:dist-svc-manifest.json:2:before") == -9
    refused(run_cli("convert", half_z, tmp_path / "y", check=False), "not finished")
    # A finished zarr store with a chunk missing, or with an enlarged shape.
    base, _ = family(3)
    store = tmp_path / "base.zarr"
    convert(base, store, progress="off")
    chunks = sorted(p for p in (store / "model.layers.0.mlp.up_proj.weight" / "c").rglob("*") if p.is_file())
    chunks[0].rename(tmp_path / "kept-chunk")
    refused(run_cli("convert", store, tmp_path / "z1", check=False), "model.layers.0.mlp.up_proj.weight", "chunk")
    (tmp_path / "kept-chunk").rename(chunks[0])
    meta_path = store / "model.norm.weight" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"] = [meta["shape"][0] + 3]
    meta_path.write_text(json.dumps(meta))
    refused(run_cli("convert", store, tmp_path / "z2", check=False), "model.norm.weight")
    chunk = next(p for p in sorted((store / "lm_head.weight" / "c").rglob("*")) if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01  # uncompressed: zarr reads it without complaint
    chunk.write_bytes(bytes(data))
    refused(run_cli("convert", store, tmp_path / "z3", check=False), "lm_head.weight", "checksum")
    assert not any((tmp_path / n).exists() for n in ("x.zarr", "y", "z1", "z2", "z3"))


def test_tensor_names_round_trip_through_zarr_exactly(tmp_path):
    gen = torch.Generator().manual_seed(0)
    names = ["params/dense/kernel", "params/dense/bias", "a.weight", "a.weight/", "/absolute", "..", "zarr.json",
             "config.json", "nul\x00name", "__reserved", ".hidden", "ünïcode", "pct%2F"]
    tensors = {n: torch.randn(3, 2, generator=gen) for n in names}
    write_hf_checkpoint(tmp_path / "src", tensors, config={"model_type": "x"})
    convert(tmp_path / "src", tmp_path / "m.zarr", progress="off")
    convert(tmp_path / "m.zarr", tmp_path / "back", progress="off")
    back = load_file(str(tmp_path / "back" / "model-00001-of-00001.safetensors"))
    assert set(back) == set(names)
    assert all(torch.equal(back[n], tensors[n]) for n in names)
    assert json.loads((tmp_path / "m.zarr" / "config.json").read_text()) == {"model_type": "x"}
    # As a merge's zarr output too: base + two fine-tunes of these names.
    for i in (1, 2):
        write_hf_checkpoint(tmp_path / f"ft{i}", {n: t + i for n, t in tensors.items()})
    cfg = write_config(tmp_path / "m.yaml", tmp_path / "src", [tmp_path / "ft1", tmp_path / "ft2"], calibrate=False)
    merge(cfg, tmp_path / "out.zarr", progress="off")
    assert verify(tmp_path / "out.zarr") == []
    from dist_svc.storage import open_checkpoint

    out = open_checkpoint(tmp_path / "out.zarr")
    assert set(out.tensors) == set(names)
    assert all(torch.equal(out.read(n), tensors[n] + 3) for n in names)


def test_a_name_too_long_for_zarr_is_refused_before_anything_is_written(tmp_path):
    write_hf_checkpoint(tmp_path / "src", {"x" * 300: torch.ones(2), "y": torch.ones(2)})
    write_hf_checkpoint(tmp_path / "ft", {"x" * 300: torch.ones(2) * 2, "y": torch.ones(2)})
    cfg = write_config(tmp_path / "m.yaml", tmp_path / "src", [tmp_path / "ft"])
    refused(run_cli_here("merge", cfg, tmp_path / "out.zarr"), "too long")
    assert not (tmp_path / "out.zarr").exists()
    refused(run_cli_here("convert", tmp_path / "src", tmp_path / "c.zarr"), "too long")


def test_a_zarr_store_whose_tensor_order_repeats_a_name_is_refused(tmp_path, family):
    base, fts = family(1)
    store = tmp_path / "base.zarr"
    convert(base, store, progress="off")
    group = json.loads((store / "zarr.json").read_text())
    order = group["attributes"]["dist_svc.tensor_order"]
    group["attributes"]["dist_svc.tensor_order"] = order + [order[0]]
    (store / "zarr.json").write_text(json.dumps(group))
    refused(run_cli_here("merge", write_config(tmp_path / "m.yaml", store, fts), tmp_path / "out"),
            "names", "twice")
    assert not (tmp_path / "out").exists()


# -- output that is not finite -----------------------------------------------------------------

@pytest.mark.parametrize("calibrate, dtype, lam", [(False, "float32", 1e39), (True, "float32", 1e39),
                                                  (True, "float64", 1e200)])
def test_a_merge_that_overflows_is_refused_naming_the_tensor_and_the_setting(tmp_path, family, calibrate, dtype, lam):
    base, fts = family(2)
    cfg = write_config(tmp_path / "m.yaml", base, fts, parameters={"lambda": lam}, dtype=dtype, calibrate=calibrate)
    stderr = refused(run_cli("merge", cfg, tmp_path / "out", check=False), "not finite", f"lambda={lam!r}")
    assert "tensor '" in stderr
    assert verify(tmp_path / "out")  # nothing that overflowed was recorded: never "verified"


# -- crafted headers -----------------------------------------------------------------------------

def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header, next(k for k in header if k != "__metadata__"))
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n:])


@pytest.mark.parametrize("edit, needle", [
    (lambda h, k: h[k].update(dtype=["F32"]), "dtype"),
    (lambda h, k: h[k].update(data_offsets=["0", "16"]), "data_offsets"),
    (lambda h, k: h[k].update(data_offsets=[0.0, 16.5]), "data_offsets"),
    (lambda h, k: h[k].update(shape=[2.5, 2]), "shape"),
    (lambda h, k: h[k].update(shape=[True, 2]), "shape"),
    (lambda h, k: h[k].update(shape=[0, 2**62], data_offsets=[0, 0]), "shape"),
    (lambda h, k: h[k].update(dtype="Q8"), "dtype"),
    (lambda h, k: h.update(__metadata__=[1]), "__metadata__"),
    (lambda h, k: h.update({k: "not an entry"}), "malformed"),
])
def test_crafted_headers_are_refused_in_one_paragraph_before_anything_is_written(tmp_path, family, edit, needle):
    base, fts = family(1)
    path = fts[0] / "model.safetensors"
    _rewrite_header(path, edit)
    refused(run_cli_here("merge", write_config(tmp_path / "m.yaml", base, fts), tmp_path / "out"),
            str(path), needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("weight_map", [{"a": 3}, ["model-00001-of-00003.safetensors"], {"a": "../../etc/passwd"}])
def test_a_crafted_index_is_refused(tmp_path, family, weight_map):
    base, fts = family(1)
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    refused(run_cli_here("merge", write_config(tmp_path / "m.yaml", base, fts), tmp_path / "out"),
            "model.safetensors.index.json")


def test_a_zero_sized_tensor_with_an_absurd_extent_merges_at_once(tmp_path, family):
    """A [0, 2**39] tensor holds no bytes: blocks are planned arithmetically, not one per slice
    (one per 8M columns would take hours), and it is not calibrated (a 2**39-wide Gram)."""
    from dist_svc.storage import open_checkpoint

    base, fts = family(1)
    for ckpt in (base, fts[0]):
        path = sorted(ckpt.glob("*.safetensors"))[-1]
        save_file(dict(load_file(str(path)), empty=torch.zeros(0, 1)), str(path))
        _rewrite_header(path, lambda h, k: h["empty"].update(shape=[0, 2**39]))
        index = ckpt / "model.safetensors.index.json"
        if index.exists():
            data = json.loads(index.read_text())
            data["weight_map"]["empty"] = path.name
            index.write_text(json.dumps(data))
    run_cli("merge", write_config(tmp_path / "m.yaml", base, fts), tmp_path / "out", timeout=60)
    assert open_checkpoint(tmp_path / "out").tensors["empty"].shape == (0, 2**39)
    assert verify(tmp_path / "out") == []


# -- the environment -----------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["nan", "inf", "1e400", "-5GB", "0", "lots"])
def test_a_shard_size_that_is_not_a_size_is_refused(tmp_path, family, size):
    base, fts = family(1)
    refused(run_cli_here("merge", write_config(tmp_path / "m.yaml", base, fts), tmp_path / "out", "--shard-size", size),
            size)
    assert not (tmp_path / "out").exists()


def test_paths_that_cannot_be_output_directories_are_refused_clearly(tmp_path, family):
    base, fts = family(1)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    (tmp_path / "file").write_text("x")
    refused(run_cli_here("merge", cfg, tmp_path / "file" / "out"), "not a directory")
    os.symlink(tmp_path / "loop-b", tmp_path / "loop-a")
    os.symlink(tmp_path / "loop-a", tmp_path / "loop-b")
    refused(run_cli_here("merge", cfg, tmp_path / "loop-a"), "loop-a")
    refused(run_cli_here("status", tmp_path / "loop-a"), "loop-a")
    refused(run_cli_here("verify", tmp_path / "loop-a"), "loop-a")
    looped = write_config(tmp_path / "loop.yaml", base, [tmp_path / "loop-a"])
    refused(run_cli_here("merge", looped, tmp_path / "out"), "loop-a", "cannot be resolved")
    refused(run_cli_here("merge", cfg, base / "merged"), "inside the input")
    refused(run_cli_here("convert", base, base / "copy.zarr"), "inside")
    assert not (base / "merged").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 48 KiB tmpfs (half of what the merge writes), or a visible skip where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): the full-disk test did not run")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_clear_error_and_the_rerun_after_freeing_space_resumes(tmp_path, merged, small_disk):
    cfg, reference = merged
    out = small_disk / "out"
    stderr = refused(run_cli("merge", cfg, out, "--shard-size", "40KB", check=False), "No space left",
                     "rerun the same command")
    assert "OSError" not in stderr
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    run_cli("merge", cfg, out, "--shard-size", "40KB")
    assert file_bytes(out) == reference and verify(out) == []


def test_a_read_only_output_filesystem_is_one_clear_error(tmp_path, family, small_disk):
    base, fts = family(1)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    refused(run_cli_here("merge", write_config(tmp_path / "m.yaml", base, fts), small_disk / "out"),
            "Read-only file system", "choose another output directory")


@pytest.mark.parametrize("flag", [("--threads", "0"), ("--threads", "-3"), ("-j", "0")])
def test_a_thread_count_below_one_is_refused(tmp_path, family, flag):
    base, fts = family(1)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    for extra in ((), ("--dry-run",)):
        refused(run_cli_here("merge", cfg, tmp_path / "out", *flag, *extra), f"--threads {flag[1]}",
                "at least 1")
    assert not (tmp_path / "out").exists()


def test_the_device_is_checked_before_anything_is_written(tmp_path, family):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    base, fts = family(1)
    refused(run_cli_here("merge", write_config(tmp_path / "m.yaml", base, fts), tmp_path / "out", "--device", "cuda"),
            "device cuda (--device", "no CUDA device")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupted_merge_says_how_to_resume_and_leaves_no_lock(tmp_path, family, sig, code):
    """Ctrl-C and SIGTERM (`kill`, a scheduler stopping the job) stop a merge the same way."""
    import signal
    import time

    from tests.test_resume import SLOW

    base, fts = family(3, arch=SLOW, shards=2)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "dist_svc.cli", "merge", str(cfg), str(out), "--progress", "off",
                             "--shard-size", "1MB"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while units_done(out)[0] < 1 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the merge finished before it could be interrupted"
    proc.send_signal(getattr(signal, sig))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code, stderr
    assert "rerun the same command to resume" in stderr and "Traceback" not in stderr, stderr
    assert not (out / ".dist-svc.lock").exists()
    assert "stopped" in run_cli("status", out).stdout


# -- multi-stage files -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, needle", [("..", "'..'"), (".", "'.'"), ("a\x00b", "control character"),
                                          ("a\\b", "path separator"), ("x" * 300, "300 bytes"), (" ", "empty")])
def test_a_stage_name_that_is_not_a_file_name_is_refused_before_anything_is_written(tmp_path, family, name, needle):
    """A stage's name becomes a directory under the stages' folder: `..` would land in OUT_DIR's
    parent, a NUL byte cannot be a path."""
    import yaml

    base, fts = family(2)
    stage = {"name": name, "merge_method": "task_arithmetic", "base_model": str(base), "models": [str(fts[0])]}
    final = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [name, str(fts[1])]}
    cfg = tmp_path / "stages.yaml"
    cfg.write_text(yaml.safe_dump(stage) + "---\n" + yaml.safe_dump(final))
    before = sorted(p.name for p in tmp_path.iterdir())
    refused(run_cli_here("merge", cfg, tmp_path / "work" / "out"), str(cfg), "document 1", "field 'name'",
            needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # not even OUT_DIR's parent was made
