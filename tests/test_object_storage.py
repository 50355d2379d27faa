"""Checkpoints on object storage, against a real S3 API (moto's server, on 127.0.0.1, started and
stopped by the session's `s3_server` fixture): safetensors by ranged reads, zarr through zarr's
own fsspec store, and the failures a user meets (no credentials, no bucket, no endpoint), each
one paragraph with nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_svc import DistSvcError
from dist_svc.commands.convert import convert
from dist_svc.commands.demo import write_hf_checkpoint
from dist_svc.storage import open_checkpoint
from tests.conftest import S3_ENV, file_bytes, free_port, run_cli, upload, write_config
from tests.contracts import CheckpointContract, LocationContract, OutputDirContract, OutputLayoutContract
from tests.test_hostile import hook_dir, killed_merge  # noqa: F401 (a fixture; kills at named points)


class TestS3Safetensors(CheckpointContract):
    @pytest.fixture(autouse=True)
    def _bucket(self, bucket):
        self.bucket = bucket

    def make(self, tmp_path, tensors, side_files):
        write_hf_checkpoint(tmp_path / "src", tensors, shards=2)
        for name, data in side_files.items():
            (tmp_path / "src" / name).write_bytes(data)
        url = upload(tmp_path / "src", f"{self.bucket}/{tmp_path.name}/model")
        return open_checkpoint(url)


class TestS3Zarr(CheckpointContract):
    @pytest.fixture(autouse=True)
    def _bucket(self, bucket):
        self.bucket = bucket

    def make(self, tmp_path, tensors, side_files):
        write_hf_checkpoint(tmp_path / "src", tensors)
        for name, data in side_files.items():
            (tmp_path / "src" / name).write_bytes(data)
        convert(tmp_path / "src", tmp_path / "m.zarr", compression="zstd", progress="off")
        return open_checkpoint(upload(tmp_path / "m.zarr", f"{self.bucket}/{tmp_path.name}/m.zarr"))


class TestS3Location(LocationContract):
    @pytest.fixture(autouse=True)
    def _bucket(self, bucket):
        self.bucket = bucket

    def make(self, tmp_path, files):
        url = f"{self.bucket}/{tmp_path.name}/ckpt"
        for name, data in files.items():
            self.rewrite(url, name, data)
        return url

    def rewrite(self, where, name, data):
        import fsspec

        fs, path = fsspec.core.url_to_fs(where)
        fs.pipe_file(f"{path}/{name}", data)


class TestObjectDir(OutputDirContract):
    @pytest.fixture(autouse=True)
    def _bucket(self, bucket):
        self.bucket = bucket

    def make(self, tmp_path):
        return f"{self.bucket}/{tmp_path.name}/out"


class TestS3SafetensorsLayout(OutputLayoutContract):
    """The safetensors layout where it stages tensors and assembles shards (object storage)."""

    FORMAT = "safetensors"
    OPTIONS = {"shard_bytes": 1000}  # several shards, one tensor larger than a shard

    @pytest.fixture(autouse=True)
    def _bucket(self, bucket):
        self.bucket = bucket

    def out_dir(self, tmp_path):
        return f"{self.bucket}/{tmp_path.name}/out"

    def flip_a_byte(self, out, layout, name):
        from dist_svc.storage.outdir import output_dir

        place = layout.placements[name]
        shard = layout.shards[place.shard].file
        raw = bytearray(output_dir(out).read(shard))
        raw[place.offset + place.nbytes // 2] ^= 0x01
        output_dir(out).write(shard, bytes(raw))


class TestS3ZarrLayout(OutputLayoutContract):
    FORMAT = "zarr"
    OPTIONS = {"compression": "zstd"}

    @pytest.fixture(autouse=True)
    def _bucket(self, bucket):
        self.bucket = bucket

    def out_dir(self, tmp_path):
        return f"{self.bucket}/{tmp_path.name}/out.zarr"

    def flip_a_byte(self, out, layout, name):
        from dist_svc.storage.outdir import output_dir

        store = output_dir(out)
        chunk = next(f"{name}/c/{key}" for key, _, _ in store.walk(f"{name}/c"))
        raw = bytearray(store.read(chunk))
        raw[len(raw) // 2] ^= 0x01
        store.write(chunk, bytes(raw))


def test_a_row_slice_fetches_the_header_then_only_its_own_bytes_in_concurrent_parts(tmp_path, bucket, monkeypatch):
    from dist_svc.storage import location

    big = torch.randn(4096, 1024, generator=torch.Generator().manual_seed(3))  # 16 MiB in float32
    write_hf_checkpoint(tmp_path / "src", {"w": big, "b": big[0].clone()})
    ckpt = open_checkpoint(upload(tmp_path / "src", f"{bucket}/big"))
    requests = []
    fs = ckpt.files[0].loc.fs
    real = fs.cat_ranges

    def counted(paths, starts, ends, **kw):
        requests.append(list(zip(starts, ends)))
        return real(paths, starts, ends, **kw)

    monkeypatch.setattr(fs, "cat_ranges", counted)
    rows = ckpt.read("w", rows=slice(1000, 3000))  # 2000 rows: 8 000 000 bytes
    assert torch.equal(rows, big[1000:3000])
    assert len(requests) == 1  # one call, its parts in flight together
    parts = requests[0]
    assert sum(e - s for s, e in parts) == 2000 * 1024 * 4  # exactly the slice, nothing more
    assert len(parts) == -(-2000 * 1024 * 4 // location.READ_PART_BYTES)


def test_a_merge_of_remote_inputs_equals_the_local_merge_byte_for_byte(tmp_path, bucket, family):
    base, fts = family(3)
    run_cli("merge", write_config(tmp_path / "local.yaml", base, fts), tmp_path / "local", "--shard-size", "40KB")
    convert(fts[1], tmp_path / "ft-2.zarr", progress="off")
    remote = [upload(base, f"{bucket}/base"), upload(fts[0], f"{bucket}/ft-1"),
              upload(tmp_path / "ft-2.zarr", f"{bucket}/ft-2.zarr"), str(fts[2])]
    cfg = write_config(tmp_path / "remote.yaml", remote[0], remote[1:])
    run_cli("merge", cfg, tmp_path / "remote", "--shard-size", "40KB")
    assert file_bytes(tmp_path / "remote") == file_bytes(tmp_path / "local")
    inputs = json.loads((tmp_path / "remote" / "dist-svc-manifest.json").read_text())["inputs"]
    assert set(inputs) == {f"{bucket}/base", f"{bucket}/ft-1", f"{bucket}/ft-2.zarr", str(fts[2])}
    assert "version" in inputs[f"{bucket}/base"]["tensors"][0]  # objects are identified by their ETag


def test_a_dry_run_on_object_storage_probes_its_round_trips_within_its_share_and_writes_nothing(tmp_path, bucket,
                                                                                                family):
    """Remote inputs: the dry run's probes read them where they are, within PROBE_SHARE of the
    job's bytes, and count a request's latency (a round trip to the S3 API is slower than a
    local read); an s3:// output is not written to, and the dry run says its writes are not
    probed."""
    import fsspec

    from dist_svc.estimate import PROBE_SHARE
    from dist_svc.driver import dry_run

    base, fts = family(3)
    local_cfg = write_config(tmp_path / "local.yaml", base, fts)
    remote = [upload(d, f"{bucket}/{d.name}") for d in (base, *fts)]
    cfg = write_config(tmp_path / "remote.yaml", remote[0], remote[1:])
    _, local, _ = dry_run(local_cfg, tmp_path / "out")
    _, est, _ = dry_run(cfg, f"{bucket}/out")
    assert est.read_bytes == local.read_bytes and 0 < est.probe_bytes <= PROBE_SHARE * est.read_bytes
    assert est.latency > local.latency > 0
    proc = run_cli("merge", cfg, f"{bucket}/out", "--dry-run")
    assert "writes to s3:// are not probed" in proc.stdout and "a new merge" in proc.stdout, proc.stdout
    fs, path = fsspec.core.url_to_fs(bucket)
    assert not fs.exists(f"{path}/out") and not (tmp_path / "out").exists()


def _refused(result: subprocess.CompletedProcess, out, *needles: str) -> None:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len([x for x in result.stderr.splitlines() if x.startswith("error: ")]) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr
    assert not out.exists()


def test_a_bucket_that_does_not_exist_is_named(tmp_path, s3_server, family):
    base, fts = family(1)
    cfg = write_config(tmp_path / "m.yaml", base, ["s3://no-such-bucket-here/ft"])
    _refused(run_cli("merge", cfg, tmp_path / "out", check=False), tmp_path / "out",
             "s3://no-such-bucket-here/ft", "bucket does not exist")


def test_an_endpoint_that_does_not_answer_is_named_quickly(tmp_path, bucket, family, monkeypatch):
    import time

    base, fts = family(1)
    cfg = write_config(tmp_path / "m.yaml", base, [f"{bucket}/ft"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    start = time.monotonic()
    _refused(run_cli("merge", cfg, tmp_path / "out", check=False), tmp_path / "out",
             f"{bucket}/ft", "cannot be reached", "AWS_ENDPOINT_URL")
    assert time.monotonic() - start < 60


def test_missing_credentials_are_named_with_where_they_come_from(tmp_path, bucket, family):
    base, fts = family(1)
    upload(fts[0], f"{bucket}/ft")
    cfg = write_config(tmp_path / "m.yaml", base, [f"{bucket}/ft"])
    env = {k: v for k, v in os.environ.items() if k not in S3_ENV or k == "AWS_DEFAULT_REGION"}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    result = subprocess.run([sys.executable, "-m", "dist_svc.cli", "merge", str(cfg), str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=300)
    _refused(result, tmp_path / "out", f"{bucket}/ft", "no credentials", "AWS_ACCESS_KEY_ID", "AWS_PROFILE")


def test_an_object_missing_under_a_prefix_is_named(bucket):
    with pytest.raises(DistSvcError, match="no such checkpoint directory"):
        open_checkpoint(f"{bucket}/nothing-here")


def test_hub_s3_safetensors_s3_zarr_an_adapter_and_a_bin_in_one_merge_give_the_local_bytes(tmp_path, bucket,
                                                                                           monkeypatch):
    """One config naming every kind of source: the base as a Hub ID (from a real cache layout,
    offline), a fine-tune as safetensors on S3, one as a zarr store on S3, a PEFT LoRA adapter
    and a legacy pytorch_model.bin. The output is byte for byte the merge of the same models as
    local safetensors directories (the adapter's dense twin holds base + scale * B @ A exactly)."""
    from safetensors.torch import load_file

    from tests.test_sources import _exact_family, checkpoint_files, hub_cache

    base, adapters, dense = _exact_family(tmp_path / "family", 4)
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_cache(cache, "acme/tiny-base", checkpoint_files(base))
    on_s3 = upload(dense[0], f"{bucket}/ft-1")
    convert(dense[1], tmp_path / "ft-2.zarr", progress="off")
    zarr_on_s3 = upload(tmp_path / "ft-2.zarr", f"{bucket}/ft-2.zarr")
    as_bin = tmp_path / "ft-4-bin"
    as_bin.mkdir()
    torch.save(load_file(str(dense[3] / "model.safetensors")), as_bin / "pytorch_model.bin")

    cfg = tmp_path / "everywhere.yaml"
    cfg.write_text("merge_method: task_arithmetic\nbase_model: acme/tiny-base\nmodels:\n"
                   f"  - model: {on_s3}\n  - model: {zarr_on_s3}\n  - model: {adapters[2]}\n  - model: {as_bin}\n"
                   "parameters: {lambda: 0.5}\n")
    run_cli("merge", cfg, tmp_path / "everywhere", "--shard-size", "40KB")
    local = write_config(tmp_path / "local.yaml", base, dense, parameters={"lambda": 0.5})
    run_cli("merge", local, tmp_path / "local", "--shard-size", "40KB")
    assert file_bytes(tmp_path / "everywhere") == file_bytes(tmp_path / "local")


# -- outputs on object storage -----------------------------------------------------------------------

def _objects(url: str) -> dict[str, bytes]:
    """Every object of an output on S3 by name (the manifest's own and the model card aside, as
    `file_bytes`)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    return {key[len(root) + 1:]: fs.cat_file(key) for key in sorted(fs.find(root, refresh=True))
            if "dist-svc-manifest" not in key and key != f"{root}/README.md"}


def _object(url: str) -> bytes:
    import fsspec

    fs, key = fsspec.core.url_to_fs(url)
    return fs.cat_file(key)


def _local_files(out: Path) -> dict[str, bytes]:
    """The same of a local output, by path within it."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and "dist-svc-manifest" not in p.name and p.name not in (".dist-svc.lock", "README.md")}


@pytest.mark.parametrize("fmt", ["safetensors", "zarr"])
def test_a_merge_to_s3_equals_the_local_merge_and_verifies(tmp_path, bucket, family, fmt):
    base, fts = family(3)
    cfg = write_config(tmp_path / "m.yaml", base, fts, output={"format": fmt})
    run_cli("merge", cfg, tmp_path / "local", "--shard-size", "40KB")
    result = run_cli("merge", cfg, f"{bucket}/merged", "--shard-size", "40KB")
    assert f"-> {bucket}/merged" in result.stdout
    assert _objects(f"{bucket}/merged") == _local_files(tmp_path / "local")
    card = (tmp_path / "local" / "README.md").read_bytes()  # the model card, on S3 too (the same config)
    assert b"# task_arithmetic merge of 3 models" in card and _object(f"{bucket}/merged/README.md") == card
    assert "verified" in run_cli("verify", f"{bucket}/merged").stdout
    assert "complete" in run_cli("status", f"{bucket}/merged").stdout
    assert "already complete" in run_cli("merge", cfg, f"{bucket}/merged", "--shard-size", "40KB").stdout


@pytest.mark.parametrize("fmt", ["safetensors", "zarr"])
def test_a_finished_s3_output_whose_bytes_changed_is_repaired_by_the_rerun(tmp_path, bucket, family, fmt):
    """The fast path compares each object's ETag with the one recorded when the merge completed:
    an object rewritten with other bytes of the same size is not "already complete"."""
    import fsspec

    base, fts = family(2)
    cfg = write_config(tmp_path / "m.yaml", base, fts, output={"format": fmt})
    url = f"{bucket}/merged"
    run_cli("merge", cfg, url, "--shard-size", "40KB")
    before = _objects(url)
    victim = sorted(k for k in before if k.startswith("model-") or "/c/" in k)[1]
    data = bytearray(before[victim])
    for i in range(len(data) - 16, len(data)):
        data[i] ^= 0xFF
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{root}/{victim}", bytes(data))
    assert run_cli("verify", url, check=False).returncode == 1
    assert "already complete" not in run_cli("merge", cfg, url, "--shard-size", "40KB").stdout
    assert _objects(url) == before
    assert "verified" in run_cli("verify", url).stdout
    assert "already complete" in run_cli("merge", cfg, url, "--shard-size", "40KB").stdout


def _recorded_on_s3(url: str) -> int:
    """Units a merge on S3 has recorded (0 before its manifest exists, or while it is replaced)."""
    from dist_svc.manifest import Manifest

    try:
        return Manifest.load(url).progress()["units_done"]
    except (DistSvcError, FileNotFoundError, OSError):
        return 0


@pytest.fixture(scope="module")
def slow_family(tmp_path_factory):
    """Large enough that kills land mid-merge (as tests/test_cluster.py's model)."""
    from dist_svc.commands.demo import TinyLlama, make_family

    root = tmp_path_factory.mktemp("s3-family")
    arch = TinyLlama(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                     num_attention_heads=4, num_key_value_heads=2)
    base, fts = make_family(root, k=3, arch=arch, dtype=torch.float32, shards=2)
    return base, fts


@pytest.fixture(scope="module")
def slow_local(tmp_path_factory, slow_family):
    """local(fmt) -> the local executor's merge of `slow_family` into a local directory, with
    output format `fmt`: what each merge of it to S3 must equal, merged once per format."""
    merged = {}

    def local(fmt: str) -> Path:
        if fmt not in merged:
            root = tmp_path_factory.mktemp(f"s3-family-local-{fmt}")
            cfg = write_config(root / "m.yaml", *slow_family, output={"format": fmt})
            run_cli("merge", cfg, root / "local", "--shard-size", "1MB")
            merged[fmt] = root / "local"
        return merged[fmt]

    return local


@pytest.mark.parametrize("fmt", ["safetensors", "zarr"])
def test_a_merge_to_s3_killed_twice_then_rerun_gives_the_local_bytes(tmp_path, bucket, slow_family, slow_local,
                                                                      monkeypatch, fmt):
    import signal
    import time

    monkeypatch.setenv("DIST_SVC_LOCK_LEASE", "2")  # a killed run's lock is taken over after 2 s
    base, fts = slow_family
    cfg = write_config(tmp_path / "m.yaml", base, fts, output={"format": fmt})
    out = f"{bucket}/merged"
    for _ in range(2):  # each run killed once it has recorded more than the one before
        at_least = _recorded_on_s3(out) + 1
        proc = subprocess.Popen([sys.executable, "-m", "dist_svc.cli", "merge", str(cfg), out, "--shard-size", "1MB",
                                 "--progress", "off"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while _recorded_on_s3(out) < at_least and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()  # still running: killed mid-merge
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = _recorded_on_s3(out)
    result = run_cli("merge", cfg, out, "--shard-size", "1MB", "--progress", "off")
    assert "already done by an earlier run" in result.stdout and "took over the lock" in result.stderr
    assert _objects(out) == _local_files(slow_local(fmt))
    assert 0 < done < 39 + 12 and "verified" in run_cli("verify", out).stdout


@pytest.mark.parametrize("fmt", ["safetensors", "zarr"])
def test_a_ray_merge_with_no_shared_filesystem_reads_and_writes_s3_only(tmp_path, bucket, ray_cluster, slow_family,
                                                                          slow_local, fmt):
    """Every input and the output are on S3: the actors (on two nodes) read their inputs by
    ranged requests and write their tensors to S3 themselves; no path is shared between nodes.
    The output equals the local executor's local merge byte for byte."""
    from tests.test_cluster import _idle

    base, fts = slow_family
    urls = [upload(d, f"{bucket}/in/{d.name}") for d in (base, *fts)]
    remote = write_config(tmp_path / "remote.yaml", urls[0], urls[1:], output={"format": fmt})
    _idle()
    out = f"{bucket}/merged"
    result = run_cli("merge", remote, out, "--shard-size", "1MB", "--progress", "log", "--cluster",
                     ray_cluster[0].address)
    assert "2 actor(s) (1 GPU each)" in result.stderr
    assert _objects(out) == _local_files(slow_local(fmt))


def test_a_second_run_on_the_same_s3_output_is_refused_while_the_first_holds_its_lease(tmp_path, bucket, family,
                                                                                       monkeypatch):
    """A live run's lock (held here, renewed by its thread as a running merge's is) refuses a
    second run on the same output; once released, the same command merges."""
    from dist_svc.manifest import LOCK_NAME
    from dist_svc.storage.outdir import RemoteLock, output_dir

    monkeypatch.setenv("DIST_SVC_LOCK_LEASE", "2")
    base, fts = family(2)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    out = f"{bucket}/merged"
    held = RemoteLock(output_dir(out), LOCK_NAME)
    held.acquire()
    try:
        second = run_cli("merge", cfg, out, "--progress", "off", check=False)
    finally:
        held.release()
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    assert f"another dist-svc run is merging into {out}" in second.stderr
    assert held.lost is None  # the refused run never took it over
    run_cli("merge", cfg, out, "--progress", "off")
    assert "verified" in run_cli("verify", out).stdout
    assert output_dir(out).info(LOCK_NAME) is None  # released at the end


def test_an_abandoned_upload_never_becomes_an_object(bucket):
    """A worker that fails mid-tensor aborts its writer: the tensor's staged object must not
    appear, not even when the writer is garbage-collected (s3fs commits an open file on
    collection, which also hung a failed merge at exit). The writer also reports its stages."""
    import gc

    from dist_svc.storage.output import layout_for

    layout = layout_for("safetensors", f"{bucket}/out", [("w", "F32", (64, 64))], {"shard_bytes": 1 << 20})
    layout.prepare({})
    writer = layout.writer("w", sync=False)
    assert writer.columns is False and {"checksum", "write"} <= set(writer.seconds)
    writer.write(bytes(64 * 32 * 4))  # half the tensor
    writer.abort()
    del writer
    gc.collect()
    assert layout.stored_checksum("w") is None
    writer = layout.writer("w", sync=False)
    writer.write(bytes(64 * 64 * 4))
    assert writer.close() == layout.stored_checksum("w")


def _start_upload(url: str, data: bytes) -> dict:
    """Another client's multipart upload of `url`, one part sent, not completed."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket, _, key = url.removeprefix("s3://").partition("/")
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
    etag = fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=data)["ETag"]
    return {"fs": fs, "Bucket": bucket, "Key": key, "UploadId": upload, "parts": [{"PartNumber": 1, "ETag": etag}]}


def _unfinished(bucket: str) -> set[str]:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    return {u["Key"] for u in fs.call_s3("list_multipart_uploads", Bucket=bucket.removeprefix("s3://"))
            .get("Uploads") or []}


@pytest.mark.parametrize("prefix", ["", "/out"])
def test_a_merge_to_s3_aborts_only_its_own_unfinished_uploads(tmp_path, bucket, family, prefix):
    """A merge aborts the unfinished uploads a killed run of it left (its shards', its staged
    tensors'), and no one else's: another client's uploads in the same bucket, under a sibling
    prefix (`out2` beside `out`) and even under the output's own prefix survive the merge, and
    that client completes them afterwards. Also at the bucket's root, where the output's prefix
    is empty."""
    base, fts = family(3)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    run_cli("merge", cfg, tmp_path / "local", "--shard-size", "40KB")
    import hashlib

    from safetensors import safe_open

    from dist_svc.storage.safetensors_output import STAGING

    shard = sorted(p.name for p in (tmp_path / "local").glob("model-*.safetensors"))[0]
    with safe_open(tmp_path / "local" / shard, "pt") as f:
        tensor = next(iter(f.keys()))
    out = f"{bucket}{prefix}"
    staged = f"{STAGING}/{shard}/{hashlib.sha256(tensor.encode()).hexdigest()[:40]}"  # as the layout names it
    for name in (shard, staged):  # what a run killed while uploading leaves
        _start_upload(f"{out}/{name}", b"a killed run's part")
    others = [_start_upload(f"{bucket}/{where}", f"another client's {where}".encode())
              for where in ("data/weights.bin", f"out2/{shard}", "out2.bin", f"out/notes/{shard}",
                            "out/notes.bin")]
    run_cli("merge", cfg, out, "--shard-size", "40KB", "--progress", "off")
    assert _unfinished(bucket) == {u["Key"] for u in others}  # its own aborted, no one else's
    for u in others:
        fs = u["fs"]
        fs.call_s3("complete_multipart_upload", Bucket=u["Bucket"], Key=u["Key"], UploadId=u["UploadId"],
                   MultipartUpload={"Parts": u["parts"]})
        assert fs.cat_file(f"{u['Bucket']}/{u['Key']}") == f"another client's {u['Key']}".encode()
    assert "verified" in run_cli("verify", out).stdout


def test_status_of_a_killed_s3_merge_says_stopped_once_its_lease_lapses_and_the_rerun_resumes(tmp_path, bucket,
                                                                                            slow_family, slow_local):
    """A lock object left by a killed run is not a running merge: `status` says "running" while
    the run renews its lease, and "stopped" (with how long ago the lease was last renewed) once it
    has gone a lease without renewal. The lease period is the one the run declared in its lock
    (6 s here), whatever this process's DIST_SVC_LOCK_LEASE. The rerun resumes to the local
    merge's bytes."""
    import signal
    import time

    from dist_svc.driver import status

    lease = 6.0
    base, fts = slow_family
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    out = f"{bucket}/merged"
    proc = subprocess.Popen([sys.executable, "-m", "dist_svc.cli", "merge", str(cfg), out, "--shard-size", "1MB",
                             "--progress", "off"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, DIST_SVC_LOCK_LEASE=str(lease)))
    deadline = time.monotonic() + 120
    while _recorded_on_s3(out) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    assert status(out)["state"] == "running"  # alive, renewing
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = time.monotonic()
    states = []
    while time.monotonic() < killed + lease + 20:
        states.append((status(out)["state"], time.monotonic() - killed))
        if states[-1][0] == "stopped":
            break
        time.sleep(0.2)
    assert states[-1][0] == "stopped", states  # not "running" forever
    assert {s for s, _ in states[:-1]} <= {"running"}, states
    # renewed every lease / 4 until the kill, "stopped" once a whole lease has passed (the storage's
    # clock counts whole seconds; slack for renewals and requests slowed by a busy machine)
    assert lease / 2 <= states[-1][1] <= lease + 5, states
    shown = run_cli("status", out).stdout
    assert f"{out}: stopped" in shown and "rerun" in shown and "lease" in shown, shown
    assert status(out)["state"] == "stopped"  # and stays so
    result = run_cli("merge", cfg, out, "--shard-size", "1MB", "--progress", "off")
    assert "already done by an earlier run" in result.stdout and "took over the lock" in result.stderr
    assert _objects(out) == file_bytes(slow_local("safetensors"))  # the model card aside: it names the inputs
    assert status(out)["state"] == "complete"


def test_status_of_a_killed_local_merge_says_stopped_at_once(tmp_path, family, hook_dir):
    """Locally the lock is a `flock`, released by the kernel when its process dies: the lock file a
    kill -9 leaves behind is not a running merge."""
    from dist_svc.driver import status
    from dist_svc.manifest import LOCK_NAME

    base, fts = family(3)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    out = tmp_path / "out"
    assert killed_merge(hook_dir, cfg, out, "pwrite:10", "--shard-size", "40KB") == -9
    assert (out / LOCK_NAME).exists()  # left by the killed run
    assert status(out)["state"] == "stopped"
    assert f"{out}: stopped" in run_cli("status", out).stdout


# -- shards assembled inside the storage service ------------------------------------------------------


class _S3Traffic:
    """The bytes one S3 client sends (request bodies) and receives (response bodies), counted
    at the client by botocore's own events, while installed."""

    def __init__(self, fs):
        fs.call_s3("list_buckets")  # the client exists from here on
        self.client = fs.s3
        self.sent = self.received = 0
        self.calls: list[str] = []

    def _request(self, request, **kwargs):
        body = request.body
        if isinstance(body, (bytes, bytearray)):
            self.sent += len(body)
        else:
            self.sent += int(request.headers.get("Content-Length") or 0)

    def _response(self, http_response, model, **kwargs):
        self.calls.append(model.name)
        self.received += int(http_response.headers.get("content-length") or 0)

    def __enter__(self):
        self.client.meta.events.register("before-send.s3", self._request)
        self.client.meta.events.register("after-call.s3", self._response)
        return self

    def __exit__(self, *exc):
        self.client.meta.events.unregister("before-send.s3", self._request)
        self.client.meta.events.unregister("after-call.s3", self._response)


def test_a_shard_of_large_tensors_is_assembled_inside_the_storage_service(tmp_path, bucket):
    """Sealing a shard on S3 copies its staged tensors into it inside the service
    (UploadPartCopy); the header travels with the first tensor's staged object. Through the
    assembling process pass only the small tensor at the end (downloaded, then uploaded as the
    last part) and the requests themselves: measured at the S3 client, for a shard of 3 tensors
    of 8 MiB and a norm, under 5% of the shard's bytes (it was all of them, twice, when the
    shard was streamed through the driver)."""
    from dist_svc.storage.output import layout_for
    from dist_svc.storage.types import TORCH_TO_ST, tensor_bytes

    gen = torch.Generator().manual_seed(5)
    tensors = {f"model.layers.{k}.mlp.up_proj.weight": torch.randn(2048, 1024, generator=gen) for k in range(3)}
    tensors["model.norm.weight"] = torch.randn(1024, generator=gen)
    entries = [(n, TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    url = f"{bucket}/out"
    layout = layout_for("safetensors", url, entries, {"shard_bytes": 1 << 30})
    assert layout.prepare({}) == [] and len(layout.shards) == 1
    recorded = {}
    for name, t in tensors.items():
        writer = layout.writer(name, sync=False)
        writer.write(tensor_bytes(t))
        recorded[name] = writer.close()
    with _S3Traffic(layout.out.fs) as traffic:
        assert any(layout.on_recorded(name) for name in list(recorded))
        assert layout.seal(recorded, fresh=set(recorded)) == []
    shard = layout.shards[0]
    expected = bytearray(shard.header) + bytes(shard.size - len(shard.header))
    for name, t in tensors.items():
        place = layout.placements[name]
        expected[place.offset:place.offset + place.nbytes] = bytes(tensor_bytes(t))
    assert layout.out.read(shard.file) == bytes(expected)
    assert traffic.calls.count("UploadPartCopy") == 3 and traffic.calls.count("UploadPart") == 1
    through = traffic.sent + traffic.received
    assert through <= 2 * 4 * tensors["model.norm.weight"].numel() + (64 << 10), traffic.calls
    assert through <= 0.05 * shard.size, (through, shard.size)


S3_KILL_HOOK = '''
import os, signal

_spec = os.environ.get("DIST_SVC_TEST_S3_KILL_AT")
if _spec:  # OPERATION:N:before|after -- the Nth S3 call of OPERATION (an s3fs client's name for it)
    import s3fs.core

    _op, _nth, _when = _spec.split(":")
    _count = [0]
    _real = s3fs.core.S3FileSystem._call_s3

    async def _call_s3(self, method, *args, **kwargs):
        if method == _op:
            _count[0] += 1
            if _count[0] == int(_nth) and _when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
        out = await _real(self, method, *args, **kwargs)
        if method == _op and _count[0] == int(_nth) and _when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    s3fs.core.S3FileSystem._call_s3 = _call_s3
    s3fs.core.S3FileSystem.call_s3 = s3fs.core.sync_wrapper(_call_s3)
'''


@pytest.fixture(scope="module")
def wide_family(tmp_path_factory):
    """(config, its local merge) of tensors of 5 to 6 MiB (float32) beside small norms: a shard of
    them is assembled of copied parts and of gathered ones. Calibration off: the assembly of the
    bytes is the point, not their arithmetic (half of each merge's time); merged locally once."""
    from dist_svc.commands.demo import TinyLlama, make_family

    root = tmp_path_factory.mktemp("s3-wide-family")
    arch = TinyLlama(vocab_size=1408, hidden_size=1024, intermediate_size=1376, num_hidden_layers=1,
                     num_attention_heads=8, num_key_value_heads=2)
    base, fts = make_family(root, k=2, arch=arch, dtype=torch.float32, shards=1)
    cfg = write_config(root / "m.yaml", base, fts, calibrate=False)
    run_cli("merge", cfg, root / "local", "--shard-size", "30MB")
    return cfg, root / "local"


@pytest.mark.parametrize("kill_at", [
    "create_multipart_upload:1:after",  # the shard's upload created, no part yet
    "upload_part_copy:2:after",  # some parts copied
    "complete_multipart_upload:1:before",  # every part there, the upload not completed
])
def test_a_merge_to_s3_killed_at_each_step_of_a_shard_assembly_resumes_to_the_local_bytes(
        tmp_path_factory, bucket, wide_family, kill_at, monkeypatch):
    """A kill while a shard is assembled leaves no shard and an unfinished upload, which the
    rerun aborts and does again: the output is the local merge's, byte for byte, and verifies."""
    import fsspec

    monkeypatch.setenv("DIST_SVC_LOCK_LEASE", "1")
    cfg, local = wide_family
    hook = tmp_path_factory.mktemp("s3-kill-hook")
    (hook / "sitecustomize.py").write_text(S3_KILL_HOOK)
    out = f"{bucket}/merged"
    path = [str(hook), os.environ.get("PYTHONPATH", ""), str(Path(__file__).parent.parent)]
    env = dict(os.environ, DIST_SVC_TEST_S3_KILL_AT=kill_at, PYTHONPATH=os.pathsep.join(path))
    killed = subprocess.run([sys.executable, "-m", "dist_svc.cli", "merge", str(cfg), out, "--shard-size", "30MB",
                             "--progress", "off"], env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr
    fs, root = fsspec.core.url_to_fs(out, skip_instance_cache=True)
    assert not fs.exists(f"{root}/model.safetensors.index.json")  # killed before it finished
    run_cli("merge", cfg, out, "--shard-size", "30MB")
    assert _objects(out) == _local_files(local)
    assert "verified" in run_cli("verify", out).stdout
