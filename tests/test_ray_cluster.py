"""serve/ray_cluster.py without starting Ray: the flags a node gets, the parse of `ray status`, the make
targets (the real two-node cluster is tests/integration/test_ray.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from serve import ray_cluster

ROOT = Path(__file__).resolve().parent.parent

# `ray status` of the two-node cluster tests/integration/test_ray.py starts (Ray 2.60.0, this machine).
STATUS = """======== Autoscaler status: 2026-12-02 04:00:46.143298 ========
Node status
---------------------------------------------------------------
Active:
 1 node_8efab0c79493a516e1d06ecc764e5a3ccdb5c87cc47524f29ac7a77b
 1 node_edd96f5c5fcc62e60deb27851272193bb14f1458807ee0f3ddbdbb24
Pending:
 (no pending nodes)
Recent failures:
 (no failures)

Resources
---------------------------------------------------------------
Total Usage:
 0.0/2.0 CPU
 0.0/1.0 kit_node_a
 0.0/1.0 kit_node_b
"""


def test_a_second_node_on_one_machine_gets_its_own_ports_and_folder(tmp_path):
    args = ray_cluster.NodeOptions(
        node_ip="127.0.0.1",
        num_cpus=1,
        num_gpus=0,
        resources={"kit_node_b": 1},
        temp_dir=tmp_path,
        port_base=26010,
    ).args()
    assert args[0] == "--disable-usage-stats"
    flags = dict(zip(args[1::2], args[2::2], strict=True))
    assert flags["--temp-dir"] == str(tmp_path) and flags["--resources"] == '{"kit_node_b": 1}'
    ports = [int(flags[f]) for f in flags if f.endswith("-port")]
    assert len(ports) == len(set(ports)) == 8 and min(ports) == 26011 and max(ports) == 26209
    assert ray_cluster.NodeOptions().args() == ["--disable-usage-stats"]  # Ray's defaults otherwise


def test_active_nodes_are_counted_from_ray_status(monkeypatch):
    monkeypatch.setattr(ray_cluster, "_run", lambda argv, timeout_s: STATUS)
    monkeypatch.setattr(ray_cluster, "ray_executable", lambda: "ray")
    assert ray_cluster.alive_nodes("127.0.0.1:6379") == 2


def test_make_ray_worker_needs_an_address():
    run = subprocess.run(["make", "-s", "ray-worker"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "set ADDRESS=<head ip>:6379" in run.stderr


@pytest.mark.parametrize("verb", ["head", "worker 10.0.0.1:6379", "status", "stop"])
def test_make_targets_call_the_module(verb):
    target = {"head": "ray-head", "status": "ray-status", "stop": "ray-stop"}.get(verb, "ray-worker")
    extra = ["ADDRESS=10.0.0.1:6379"] if target == "ray-worker" else []
    plan = subprocess.run(
        ["make", "-n", target, *extra], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert f"-m serve.ray_cluster {verb}" in plan.stdout
