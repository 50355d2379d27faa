"""Every option of where units run (`ExecutionOptions`: --device, --threads, --memory-limit, ...)
either applies to the executor chosen or is refused by name before anything is written or any
cluster is reached; and a dry run with --cluster estimates for the cluster, not this machine."""

from __future__ import annotations

import socket

import pytest

import dist_svc
from dist_svc import DistSvcError
from tests.conftest import run_cli, write_config


def _nobody_listens() -> str:
    with socket.socket() as s:  # a free port on this machine, with nothing listening on it
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("flags, named", [(["--threads", "2"], "--threads 2"), (["-j", "2"], "--threads 2"),
                                          (["--device", "cuda:1"], "--device cuda:1")],
                         ids=["threads", "mergekit -j", "a device index"])
@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["merge", "dry-run"])
def test_an_option_that_does_not_apply_to_a_cluster_is_refused_by_name_before_connecting(tmp_path, family, flags,
                                                                                          named, dry_run):
    base, fts = family(2)
    address = _nobody_listens()
    proc = run_cli("merge", write_config(tmp_path / "m.yaml", base, fts), tmp_path / "out", "--cluster", address,
                   *flags, *dry_run, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and named in errors[0] and "--cluster" in errors[0], proc.stderr
    assert "no Ray cluster answers" not in proc.stderr  # refused before connecting
    assert proc.stdout == "" and not (tmp_path / "out").exists()


def test_the_python_api_refuses_threads_with_a_cluster_by_name(tmp_path, family):
    base, fts = family(2)
    with pytest.raises(DistSvcError, match=r"--threads 2 \(threads=, mergekit's -j\): on a cluster each actor"):
        dist_svc.merge(write_config(tmp_path / "m.yaml", base, fts), tmp_path / "out", cluster=_nobody_listens(),
                       threads=2)
    assert not (tmp_path / "out").exists()


def test_a_dry_run_with_a_cluster_estimates_for_the_cluster_not_this_machine(tmp_path, family, ray_cluster):
    """The test cluster: a head without GPUs and 2 nodes with one (fake) GPU each. The memory
    that decides what fits is each actor's; the devices are the cluster's (--device cpu: one
    actor per node, GPUs unused)."""
    from dist_svc.executors.ray_cluster import RayExecutor
    from dist_svc.progress import human_bytes

    c, _ = ray_cluster
    base, fts = family(2)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    local = run_cli("merge", cfg, tmp_path / "out", "--dry-run").stdout
    assert " available: " in local and "here with" in local and "actor" not in local
    on_gpus = run_cli("merge", cfg, tmp_path / "out", "--dry-run", "--cluster", c.address).stdout
    executor = RayExecutor(c.address)
    assert f"runs on     {executor.describe()}" in on_gpus and "2 actor(s) (1 GPU each)" in on_gpus
    memory = human_bytes(executor.capacity().memory.host)
    assert f"; {memory} for each of 2 actors (their GPUs' memory is checked as they start): 4 of those at once" \
        in on_gpus, on_gpus
    assert "here with" not in on_gpus and " available: " not in on_gpus and "4 worker(s)" in on_gpus
    on_cpus = run_cli("merge", cfg, tmp_path / "out", "--dry-run", "--cluster", c.address, "--device", "cpu").stdout
    assert "3 actor(s) (1 CPU each)" in on_cpus and "for each of 3 actors:" in on_cpus
    assert not (tmp_path / "out").exists()


def test_device_cpu_applies_to_a_cluster_one_cpu_actor_per_node_and_the_same_bytes(tmp_path, family, ray_cluster):
    from tests.conftest import file_bytes

    c, _ = ray_cluster
    base, fts = family(2)
    cfg = write_config(tmp_path / "m.yaml", base, fts)
    run_cli("merge", cfg, tmp_path / "local", "--progress", "off")
    proc = run_cli("merge", cfg, tmp_path / "cluster", "--progress", "off", "--cluster", c.address, "--device", "cpu")
    assert "3 actor(s) (1 CPU each)" in proc.stderr and ":cpu" in proc.stderr, proc.stderr  # actors ready on cpu
    assert file_bytes(tmp_path / "cluster") == file_bytes(tmp_path / "local")
