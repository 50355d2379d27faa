from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dist_svc.commands.demo import TinyLlama, make_family

# Small enough for an exact float64 reference, with the real names, several shards, GQA shapes
# (k/v projections wider than tall), tall MLP matrices and embeddings that calibration skips.
TINY = TinyLlama(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="session")
def _made_families(tmp_path_factory):
    """made(**make_family's arguments) -> a directory holding that family, generated once per
    session (make_family is deterministic for its arguments); never handed to a test itself."""
    made: dict[str, Path] = {}

    def made_once(**args) -> Path:
        key = repr(sorted(args.items()))
        if key not in made:
            root = tmp_path_factory.mktemp("family")
            make_family(root, **args)
            made[key] = root
        return made[key]

    return made_once


@pytest.fixture
def family(tmp_path, _made_families):
    """make(k, dtype=..., ...) -> (base_dir, [ft_dirs]) of a tiny Llama-layout model family: this
    test's own copy (its files are the test's to change) of the family generated once per session."""
    import shutil

    def make(k: int = 3, dtype=torch.float32, arch: TinyLlama = TINY, shards: int = 3, seed: int = 0, **kw):
        root = tmp_path / f"family-k{k}-{str(dtype).split('.')[-1]}-s{seed}"
        if not (root / "base").exists():
            shutil.copytree(_made_families(k=k, arch=arch, dtype=dtype, shards=shards, seed=seed, **kw), root,
                            dirs_exist_ok=True)
        return root / "base", sorted(root.glob("ft-*"), key=lambda p: int(p.name[3:]))

    return make


def write_config(path: Path, base: Path, fts: list[Path], weights=None, **top) -> Path:
    weights = weights or [1.0] * len(fts)
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base),
           "models": [{"model": str(f), "parameters": {"weight": w}} for f, w in zip(fts, weights)]}
    cfg.update(top)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_cli(*args, check: bool = True, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`dist-svc ARGS` in a fresh process, as a user runs it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "dist_svc.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"dist-svc {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def run_cli_here(*args) -> subprocess.CompletedProcess:
    """`dist-svc ARGS` through the same command group in this process (click's test runner), for
    a refusal: what is checked is its exit status and its paragraph, not a fresh process (a
    torch import less per call). An exception the command does not turn into its paragraph
    propagates and fails the test, as its traceback would in run_cli's process."""
    import signal

    from click.testing import CliRunner

    from dist_svc.cli import main

    sigterm = signal.getsignal(signal.SIGTERM)  # the command installs its own; pytest's comes back
    try:
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    return subprocess.CompletedProcess(["dist-svc", *map(str, args)], result.exit_code, result.stdout, result.stderr)


def file_bytes(out_dir: Path) -> dict[str, bytes]:
    """Every file of a merged output, by name (the manifest and its previous copy aside: they
    record timings; and the model card, which names the inputs, where the merges compared read
    the same bytes from different places: test_model_card checks it is the same for every run)."""
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())
            if p.is_file() and "dist-svc-manifest" not in p.name and p.name != "README.md"}


def units_done(out_dir: Path) -> tuple[int, int]:
    """(units recorded done, total) from a merge's manifest (snapshot and journal, as a rerun
    reads them); (0, -1) before it exists."""
    from dist_svc import DistSvcError
    from dist_svc.manifest import Manifest

    try:
        manifest = Manifest.load(out_dir)
    except DistSvcError:
        return 0, -1
    return len(manifest.recorded), len(manifest.units)


def kill_mid_run(args, out_dir: Path, at_least: int) -> None:
    """Start `dist-svc ARGS`, SIGKILL it once `at_least` more units are recorded in the merge
    output `out_dir`, mid-run (it must not have finished)."""
    before, _ = units_done(out_dir)
    proc = subprocess.Popen([sys.executable, "-m", "dist_svc.cli", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and units_done(out_dir)[0] < before + at_least:
            time.sleep(0.002)
        assert proc.poll() is None, "the run finished before it could be killed; make its model bigger"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done, total = units_done(out_dir)
    assert 0 < done < total


def stored_at(out_dir: Path, name: str) -> tuple[Path, int, int, list[str]]:
    """Where a tensor of a safetensors merge output is now, from its output layout: (the shard
    file holding it, final or .partial; byte offset; size; every tensor of that shard)."""
    from dist_svc.driver import open_output

    _, layout = open_output(out_dir)
    place = layout.placements[name]
    partial = layout.partial(place.shard)
    path = partial if partial.exists() else layout.final(place.shard)
    return path, place.offset, place.nbytes, list(layout.shards[place.shard].tensors)


# -- object storage: a real S3 API on 127.0.0.1 ------------------------------------------------------

S3_ENV = {"AWS_ACCESS_KEY_ID": "dist-svc-test", "AWS_SECRET_ACCESS_KEY": "dist-svc-test-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server in a process of its own on 127.0.0.1, for the whole session (stopped by
    its pid at the end). Endpoint and credentials reach every client, subprocesses and Ray
    actors included, the usual way: AWS_ENDPOINT_URL and AWS_ACCESS_KEY_ID in the environment."""
    import socket
    import time

    pytest.importorskip("moto", reason="object storage tests need moto[server]: pip install -e '.[test]'")
    pytest.importorskip("s3fs", reason="object storage tests need s3fs: pip install -e '.[test]'")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "moto's S3 server did not start"
            time.sleep(0.05)
    saved = {k: os.environ.get(k) for k in (*S3_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(s3_server, request):
    """A new, empty bucket for one test: s3://NAME."""
    import re

    import s3fs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{free_port()}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"


def upload(local: Path, url: str) -> str:
    """Copy a local checkpoint (directory or file) to object storage; returns the URL."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if Path(local).is_dir():
        for f in sorted(Path(local).rglob("*")):
            if f.is_file():
                fs.pipe_file(f"{path}/{f.relative_to(local).as_posix()}", f.read_bytes())
    else:
        fs.pipe_file(path, Path(local).read_bytes())
    return url


# -- a local Ray cluster, one per session ------------------------------------------------------------

# Set before Ray is imported (it reads them at import), the same for every node and driver (the
# merge subprocesses inherit them): no token auth for this throwaway cluster, and every address
# on the loopback interface, so the test cluster talks only to this machine.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
RAY_NODE = {"num_cpus": 1, "num_gpus": 1, "object_store_memory": 80 * 2**20, "node_ip_address": "127.0.0.1"}


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A head and 2 nodes with one fake GPU each, all on 127.0.0.1, shared by every test that
    needs Ray. Started after the S3 server, so that its processes (the actors) find the
    endpoint and credentials in their environment, as a real cluster's nodes would."""
    ray = pytest.importorskip("ray", reason="the cluster tests need Ray: pip install -e '.[test]'")
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 0, "object_store_memory": 80 * 2**20, "node_ip_address": "127.0.0.1",
        "include_dashboard": False})
    nodes = [c.add_node(**RAY_NODE) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="dist-svc", log_to_driver=False)
    yield c, nodes
    ray.shutdown()
    c.shutdown()
