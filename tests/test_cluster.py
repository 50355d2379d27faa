"""`dist-svc merge --cluster` on a real local multi-node Ray cluster (head + 2 nodes with one fake
GPU each, all on 127.0.0.1), against the local executor's bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dist_svc.commands.demo import TinyLlama
from tests.conftest import RAY_NODE, file_bytes, run_cli, units_done, write_config
from tests.contracts import ExecutorContract

ray = pytest.importorskip("ray", reason="the cluster tests need Ray: pip install -e '.[test]'")

# Large enough that kills land mid-merge (~0.1-0.3 s per matrix with calibration).
MODEL = TinyLlama(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture
def cluster(ray_cluster):
    """The session's local cluster (tests/conftest.py: head + 2 nodes with one fake GPU each)."""
    return ray_cluster


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from dist_svc.commands.demo import make_family

    root = tmp_path_factory.mktemp("cluster-family")
    base, fts = make_family(root, k=3, arch=MODEL, dtype=torch.float32, shards=2)
    cfg = write_config(root / "m.yaml", base, fts)
    local = root / "local"
    run_cli("merge", cfg, local, "--shard-size", "1MB", "--progress", "off")
    return cfg, file_bytes(local)


def _merge(cfg, out, address, progress="log", **popen):
    return subprocess.Popen([sys.executable, "-m", "dist_svc.cli", "merge", str(cfg), str(out), "--shard-size", "1MB",
                             "--progress", progress, "--cluster", address], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)



def _wait_for(proc, out, at_least: int) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if units_done(out)[0] >= at_least:
            return
        time.sleep(0.01)
    raise AssertionError(f"the merge did not get to {at_least} units mid-run: {proc.poll()}, "
                         f"{proc.stderr.read() if proc.poll() is not None else ''}")


def _idle(timeout: float = 60) -> None:
    """Wait until the previous test's actors are gone and both fake GPUs are free again."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("GPU", 0) < 2:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.1)


def _run_actor_pids() -> list[int]:
    """The processes of the running merge's actors (named merge-*, in the dist-svc namespace)."""
    pids = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == "dist-svc":
            try:
                pids.append(int(ray.get(ray.get_actor(a["name"], namespace="dist-svc").ready.remote(),
                                        timeout=10).split(":")[1]))
            except (ray.exceptions.RayError, ValueError):
                pass
    return pids


def _node_of(pid: int, nodes) -> object:
    """The cluster node whose raylet started process `pid` (its ancestor in /proc)."""
    raylets = {n.all_processes["raylet"][0].process.pid: n for n in nodes}
    while pid > 1:
        if pid in raylets:
            return raylets[pid]
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    raise AssertionError("actor not under any worker node's raylet")


def _finish(proc) -> str:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return stdout + stderr


def _on_screen(stream: str) -> list[str]:
    """The lines a terminal shows for `stream`: of each line, what follows its last carriage
    return (a progress bar redraws itself over the same line)."""
    return [line.rsplit("\r", 1)[-1] for line in stream.split("\n")]


def test_a_cluster_merge_equals_the_local_merge_byte_for_byte(tmp_path, cluster, model):
    """... and its lines are said once each, above the progress bar, never glued into it."""
    c, _ = cluster
    cfg, local = model
    _idle()
    proc = _merge(cfg, tmp_path / "out", c.address, progress="bar")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert stderr.count("2 actor(s) (1 GPU each)") == 1
    said = [line for line in _on_screen(stderr) if "cluster:" in line]
    assert len(said) >= 3 and all(line.startswith("cluster: ") for line in said), said  # ready x2, where logs go
    assert file_bytes(tmp_path / "out") == local


def test_zarr_output_written_by_actors_in_separate_processes_loses_nothing(tmp_path, cluster, model):
    """Two actor processes (on two nodes) write arrays of one zarr store at once, each tensor by
    one writer: every tensor equals the local safetensors merge's, and verify passes."""
    from dist_svc.driver import verify
    from dist_svc.storage import open_checkpoint
    from dist_svc.storage.safetensors_reader import SafetensorsCheckpoint

    c, _ = cluster
    cfg, _ = model
    _idle()
    out = tmp_path / "merged.zarr"
    _finish(_merge(cfg, out, c.address))
    local = SafetensorsCheckpoint(cfg.parent / "local")
    got = open_checkpoint(out)
    assert set(got.tensors) == set(local.tensors)
    for name in local.tensors:
        assert torch.equal(got.read(name), local.read(name)), name
    assert verify(out) == []


def _mid_merge(tmp_path, cluster, model, at_least: int):
    """A cluster merge started on an idle cluster and running, with `at_least` units recorded."""
    c, _ = cluster
    cfg, _ = model
    _idle()
    out = tmp_path / "out"
    proc = _merge(cfg, out, c.address)
    _wait_for(proc, out, at_least)
    return proc, out


def test_an_actor_killed_mid_merge_costs_only_its_units(tmp_path, cluster, model):
    proc, out = _mid_merge(tmp_path, cluster, model, at_least=3)
    pids = _run_actor_pids()
    assert pids
    os.kill(pids[0], signal.SIGKILL)  # a crash, not a polite stop
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "an actor died" in stderr
    assert file_bytes(out) == model[1]
    # Ray's own report of the lost worker goes to the file the merge named, not to the terminal:
    # stdout is the result alone.
    assert stdout.splitlines() == [line for line in stdout.splitlines() if line.startswith("merged 39 tensors")]
    assert len(stdout.splitlines()) == 1 and "(raylet)" not in stderr
    where = stderr.split("Ray's own messages (workers or nodes lost, with their last log lines) go to ")[1]
    assert os.path.isfile(where.split(";")[0])


def test_a_node_removed_mid_merge_still_finishes_identically(tmp_path, cluster, model):
    c, nodes = cluster
    proc, out = _mid_merge(tmp_path, cluster, model, at_least=3)
    pids = _run_actor_pids()
    assert pids
    victim = _node_of(pids[0], nodes)  # a node that is running part of this merge
    c.remove_node(victim)
    try:
        log = _finish(proc)
    finally:
        nodes[nodes.index(victim)] = c.add_node(**RAY_NODE)  # the node back, for the tests after this one
        c.wait_for_nodes()
    assert "an actor died" in log
    assert file_bytes(out) == model[1]


def test_a_driver_killed_mid_merge_is_finished_by_rerunning_the_same_command(tmp_path, cluster, model):
    proc, out = _mid_merge(tmp_path, cluster, model, at_least=4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done, total = units_done(out)
    assert 0 < done < total
    log = _finish(_merge(model[0], out, cluster[0].address))
    assert f"merged {total - done} tensors" in log and f"{done} already done by an earlier run" in log
    assert file_bytes(out) == model[1]


def test_a_bad_input_found_on_an_actor_is_the_same_clear_error_as_locally(tmp_path, cluster, family):
    from safetensors.torch import load_file, save_file

    base, fts = family(2)
    path = fts[0] / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(tensors, str(path))
    _idle()
    proc = _merge(write_config(tmp_path / "m.yaml", base, fts), tmp_path / "out", cluster[0].address)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr
    assert "error: tensor 'model.layers.0.mlp.up_proj.weight'" in stderr and str(path) in stderr
    assert "Traceback" not in stderr


def test_an_address_where_no_cluster_answers_is_refused_at_once_and_nothing_is_written(tmp_path, family):
    import socket

    base, fts = family(1)
    with socket.socket() as s:  # a free port on this machine, with nothing listening on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    result = run_cli("merge", write_config(tmp_path / "m.yaml", base, fts), tmp_path / "out",
                     "--cluster", f"127.0.0.1:{port}", check=False)
    assert result.returncode == 2 and f"no Ray cluster answers at 127.0.0.1:{port}" in result.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "out").exists()


class TestRayExecutor(ExecutorContract):
    @pytest.fixture(autouse=True)
    def _on_the_cluster(self, cluster):
        self.address = cluster[0].address
        _idle()

    def executor(self):
        from dist_svc.executors.ray_cluster import RayExecutor

        return RayExecutor(address=self.address)



def _session_pids(sid: int) -> list[int]:
    """The live processes of a session (exited ones not yet reaped, state Z, are gone)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True, check=True).stdout
    return [int(pid) for pid, s, stat in (line.split() for line in out.splitlines())
            if int(s) == sid and not stat.startswith("Z")]


def test_the_local_cluster_script_stops_its_own_cluster_and_no_other():
    """cluster/local-cluster.sh stop ends the processes of the nodes it started (head and worker,
    each in a session it recorded), and another Ray cluster on the same machine keeps answering.
    Costs ~30-40 s on a loaded 2-core VM: three `ray start`s (~5-10 s each) and a stop's grace."""
    import shutil
    import tempfile
    from pathlib import Path

    from tests.conftest import free_port

    ray_bin = str(Path(sys.executable).parent / "ray")
    script = Path(__file__).resolve().parent.parent / "cluster" / "local-cluster.sh"
    ours, theirs = free_port(), free_port()
    tmp_path = Path(tempfile.mkdtemp(prefix="lc-", dir="/tmp"))  # Ray's socket paths must stay short
    env = dict(os.environ, RAY=ray_bin, RAY_PORT=str(ours), RAY_CLUSTER_STATE=str(tmp_path / "state"),
               RAY_AUTH_MODE="disabled")
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    # Someone else's cluster, in a session of its own (its id: the pid of its `ray start`), so
    # that this test can end it afterwards.
    other = subprocess.Popen([ray_bin, "start", "--head", "--port", str(theirs), "--node-ip-address", "127.0.0.1",
                              "--num-cpus", "1", "--include-dashboard", "false", "--disable-usage-stats",
                              "--temp-dir", str(tmp_path / "other")], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert other.wait(timeout=120) == 0, other.stderr.read()
        subprocess.run(["bash", str(script), "start", "1"], env=env, check=True, capture_output=True, timeout=180)
        sessions = [int(s) for s in (tmp_path / "state" / "sessions").read_text().split()]
        assert len(sessions) == 2 and all(_session_pids(s) for s in sessions)  # the head and one node, running
        stop = subprocess.run(["bash", str(script), "stop"], env=env, capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0, stop.stderr
        assert not any(_session_pids(s) for s in sessions) and not (tmp_path / "state").exists()
        status = subprocess.run([ray_bin, "status", "--address", f"127.0.0.1:{theirs}"], env=env,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "Active:" in status.stdout, status.stdout + status.stderr
    finally:
        if (tmp_path / "state").exists():  # only a cluster the script recorded is stopped by it
            subprocess.run(["bash", str(script), "stop"], env=env, capture_output=True, timeout=60)
        for pid in _session_pids(other.pid):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp_path, ignore_errors=True)


# -- the driver off the data path ------------------------------------------------------------------------

# A few tensors of 2-16 MiB (80 MiB of float32 output) in one file per input: the output dwarfs
# what the driver reads and writes whatever the model's size (the inputs' headers: the reader
# takes the first MiB of each file; the manifest, the index, the side files).
# Every matrix 6.25 MiB (float32): a real model's matrices are all larger than an object store's
# smallest multipart part (5 MiB), and only the norms pass through the assembling process.
WIDE = TinyLlama(vocab_size=1280, hidden_size=1280, intermediate_size=1280, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=8)
DRIVER_SHARE = 0.05  # of the output's bytes, at most, read and written by the driver process


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """(config, the local executor's output files) of a merge of WIDE, calibration off (no
    arithmetic worth the wait: the bytes are the point)."""
    from dist_svc import merge
    from dist_svc.commands.demo import make_family

    root = tmp_path_factory.mktemp("wide-family")
    base, fts = make_family(root, k=2, arch=WIDE, dtype=torch.float32, shards=1)
    cfg = write_config(root / "m.yaml", base, fts)
    merge(cfg, root / "local", calibrate=False, shard_size="16MB", progress="off", device="cpu")
    return cfg, file_bytes(root / "local")


def _proc_io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f.read().splitlines())}


def _driver_moves(call) -> tuple[object, int]:
    """(what `call()` returns, the bytes this process read and wrote meanwhile: files and pipes
    (rchar, wchar) and what reached storage (read_bytes, write_bytes), the larger of the two)."""
    before = _proc_io()
    result = call()
    after = _proc_io()
    delta = {k: after[k] - before[k] for k in after}
    return result, max(delta["rchar"] + delta["wchar"], delta["read_bytes"] + delta["write_bytes"])


def _cluster_merge(cfg, out, address, executor=None, **options):
    from dist_svc import merge
    from dist_svc.executors import build_executor

    return merge(cfg, out, progress="off", executor=executor or build_executor(cluster=address),
                 **({"calibrate": False, "shard_size": "16MB"} | options))


def _output_bytes(files: dict[str, bytes]) -> int:
    return sum(len(data) for name, data in files.items() if name.endswith(".safetensors"))


def test_the_driver_reads_and_writes_under_5_percent_of_the_output_and_the_bytes_equal_the_local_merge(
        tmp_path, cluster, wide, model):
    """The actors write, fsync and check their own bytes; the driver plans, queues and records.
    Measured after the driver's imports: a first merge (of the small model, its units several
    to a call) imports what the driver needs."""
    cfg, local = wide
    _idle()
    _cluster_merge(model[0], tmp_path / "small", cluster[0].address, calibrate=None, shard_size="1MB")
    assert file_bytes(tmp_path / "small") == model[1]
    _idle()
    report, moved = _driver_moves(lambda: _cluster_merge(cfg, tmp_path / "out", cluster[0].address))
    assert report.units_run == report.units_total
    assert file_bytes(tmp_path / "out") == local
    assert moved <= DRIVER_SHARE * _output_bytes(local), (moved, _output_bytes(local))


class _Interrupted(Exception):
    pass


def _interrupt_after(executor, count: int):
    """`executor`, whose run stops (as a killed driver would) once `count` units are recorded."""
    run = executor.run

    def interrupted(job, units, on_result, on_progress=None):
        seen = []

        def record(result):
            on_result(result)
            seen.append(result.name)
            if len(seen) == count:
                raise _Interrupted

        run(job, units, record, on_progress)

    executor.run = interrupted
    return executor


def test_units_an_earlier_run_recorded_are_checked_by_the_actors_not_the_driver(tmp_path, cluster, wide):
    """A run stopped after some units; one of its recorded tensors is then damaged on disk. The
    rerun has the actors check what the earlier run recorded: the driver reads again only the
    damaged tensor (which is merged again), and the output equals the local merge."""
    from dist_svc.executors import build_executor
    from tests.conftest import stored_at, units_done

    cfg, local = wide
    out = tmp_path / "out"
    _idle()
    with pytest.raises(_Interrupted):
        _cluster_merge(cfg, out, None, _interrupt_after(build_executor(cluster=cluster[0].address), 4))
    done, total = units_done(out)
    assert 4 <= done < total
    from dist_svc.manifest import Manifest

    recorded = Manifest.load(out).recorded
    unsealed = [n for n in recorded if stored_at(out, n)[0].name.endswith(".partial")]
    assert unsealed, "every recorded tensor is in a sealed shard: nothing to check"
    path, offset, nbytes, _ = stored_at(out, unsealed[0])
    with open(path, "r+b") as f:  # same size, other bytes
        f.seek(offset)
        first = f.read(1)
        f.seek(offset)
        f.write(bytes([first[0] ^ 0xFF]))
    _idle()
    report, moved = _driver_moves(lambda: _cluster_merge(cfg, out, cluster[0].address))
    assert report.units_run == total - done + 1  # the damaged one again
    assert file_bytes(out) == local
    assert moved <= DRIVER_SHARE * _output_bytes(local) + nbytes, (moved, _output_bytes(local), nbytes)


def test_verify_on_a_cluster_checks_every_tensor_on_the_actors_and_finds_a_damaged_one(tmp_path, cluster, wide):
    from dist_svc.driver import verify
    from tests.conftest import stored_at

    cfg, local = wide
    out = tmp_path / "out"
    _idle()
    _cluster_merge(cfg, out, cluster[0].address)
    _idle()
    problems, moved = _driver_moves(lambda: verify(out, cluster=cluster[0].address))
    assert problems == []
    assert moved <= DRIVER_SHARE * _output_bytes(local), moved
    name = "model.layers.0.mlp.down_proj.weight"
    path, offset, _, _ = stored_at(out, name)
    with open(path, "r+b") as f:
        f.seek(offset + 100)
        byte = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([byte[0] ^ 0x01]))
    _idle()
    result = run_cli("verify", "--cluster", cluster[0].address, out, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"tensor '{name}' does not match its checksum (corrupted)" in result.stderr
    assert result.stderr.count("does not match its checksum") == 1 and "verified" not in result.stdout


ACTOR_KILL_HOOK = '''
import os, signal

_mark = os.environ.get("DIST_SVC_TEST_KILL_AFTER_SYNC")
if _mark:  # the first fdatasync of a tensor's bytes in any actor, once: then the actor dies
    _fdatasync = os.fdatasync

    def fdatasync(fd):
        _fdatasync(fd)
        try:
            os.close(os.open(_mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)

    os.fdatasync = fdatasync
'''


def test_an_actor_killed_after_writing_and_before_returning_is_run_again_to_identical_bytes(tmp_path, cluster, model):
    """The kill lands after a unit's bytes are written and durable, before the actor checks and
    returns them: the unit is unrecorded, runs again on another actor, and the output equals the
    local merge's. The hook reaches the actors through the job's runtime environment, as Ray
    Jobs passes one to a driver."""
    import json
    from pathlib import Path

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(ACTOR_KILL_HOOK)
    mark = tmp_path / "killed"
    path = os.pathsep.join([str(hooks), str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])
    job = {"runtime_env": {"env_vars": {"PYTHONPATH": path, "DIST_SVC_TEST_KILL_AFTER_SYNC": str(mark)}}}
    _idle()
    out = tmp_path / "out"
    log = _finish(_merge(model[0], out, cluster[0].address,
                         env=dict(os.environ, RAY_JOB_CONFIG_JSON_ENV_VAR=json.dumps(job))))
    assert mark.exists(), "no actor was killed"
    assert "an actor died" in log
    assert file_bytes(out) == model[1]


class _CountingRelay:
    """A TCP relay in this process between its S3 client and the S3 server, counting the bytes
    that pass either way: what the driver itself sends to and receives from the storage (the
    actors, in their own processes, reach the server directly)."""

    def __init__(self, target: str):
        import socket
        import threading

        host, port = target.removeprefix("http://").rsplit(":", 1)
        self.target = (host, int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.bytes = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source, sink) -> None:
        import socket

        try:
            while data := source.recv(1 << 20):
                with self.lock:
                    self.bytes += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


def test_into_s3_the_driver_moves_under_5_percent_of_the_output_and_the_bytes_equal_the_local_merge(
        tmp_path, cluster, wide, model, s3_server, bucket, monkeypatch):
    """As on a shared directory, counting the driver's S3 traffic (through a relay) with its file
    and pipe bytes (/proc/self/io)."""
    import s3fs

    cfg, local = wide
    relay = _CountingRelay(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", relay.url)  # this process only: the actors keep the server's
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        _idle()
        # The driver's imports and its S3 client (botocore's service models) come first.
        _cluster_merge(model[0], f"{bucket}/small", cluster[0].address, calibrate=None, shard_size="1MB")
        relay.bytes = 0
        _idle()
        report, moved = _driver_moves(lambda: _cluster_merge(cfg, f"{bucket}/out", cluster[0].address))
    finally:
        relay.close()
        monkeypatch.undo()
        s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    got = {name: fs.cat_file(f"{bucket}/out/{name}") for name in local}
    assert got == local
    assert moved + relay.bytes <= DRIVER_SHARE * _output_bytes(local), (moved, relay.bytes, _output_bytes(local))


def test_a_sweep_on_the_cluster_into_s3_writes_what_the_local_sweep_writes(tmp_path, cluster, model, bucket,
                                                                            s3_server):
    """`dist-svc sweep --cluster` into s3://: each actor reads a unit once for every variant;
    every variant's objects equal the local sweep's files byte for byte."""
    import s3fs

    cfg, _ = model
    sets = ["--set", "parameters.lambda=0.5,1", "--set", "calibrate.alpha=0.3,1", "--shard-size", "1MB"]
    run_cli("sweep", cfg, tmp_path / "local", *sets, "--progress", "off")
    _idle()
    proc = run_cli("sweep", cfg, f"{bucket}/sweep", *sets, "--progress", "off", "--cluster", cluster[0].address)
    assert "4 variants" in proc.stdout
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for variant in (tmp_path / "local").iterdir():
        if variant.is_dir():
            local = file_bytes(variant)
            assert {name: fs.cat_file(f"{bucket}/sweep/{variant.name}/{name}") for name in local} == local, variant.name
