"""Several gateway workers, each on its own ``SO_REUSEPORT`` socket (serve/gateway/workers.py): new
connections spread over the workers, a worker that dies is replaced, and a gateway on a port in use
fails with the reason."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from tests.gateway_process import ROOT, GatewayProcess, gateway_process
from tests.test_gateway_policy import fake_upstream

CONNECTIONS = 64  # the harness's wrk burst; each worker gets 32 +- 4 by the hash, fewer than 16: ~1e-4


@pytest.fixture
def upstream_url(serve_aiohttp: Callable[..., Any]) -> str:
    app, _ = fake_upstream()
    return str(serve_aiohttp(app).url)


def _owners(gateway: GatewayProcess, clients: list[socket.socket]) -> Counter[int]:
    ports = {client.getsockname()[1] for client in clients}
    return Counter(gateway.workers_of(ports).values())


def _burst(gateway: GatewayProcess) -> list[socket.socket]:
    clients = []
    for _ in range(CONNECTIONS):
        clients.append(socket.create_connection(("127.0.0.1", gateway.port), timeout=10))
    return clients


def _listeners(pid: int, port: int) -> set[str]:
    """The listening sockets on ``port`` that process ``pid`` holds, as ``socket:[inode]``."""
    process = psutil.Process(pid)
    fds = {c.fd for c in process.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
    fds &= {c.fd for c in process.net_connections(kind="tcp") if c.laddr.port == port}
    return {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds}


def test_each_worker_listens_on_a_socket_of_its_own(tmp_path, upstream_url):
    """The mechanism: one socket per worker in a SO_REUSEPORT group (uvicorn's supervisor would give
    every worker the one socket it bound, and hold it too)."""
    with gateway_process(tmp_path, upstream_url, {"KIT_GATEWAY_CREATE_KEYS_DB": "true"}) as gateway:
        workers = sorted(gateway.worker_pids())
        sockets = [_listeners(pid, gateway.port) for pid in workers]
        supervisor = _listeners(gateway.process.pid, gateway.port)
    assert len(workers) == 2 and all(len(held) == 1 for held in sockets), sockets
    assert sockets[0] != sockets[1], f"both workers hold {sockets[0]}"
    assert not supervisor, f"the supervisor listens too: {supervisor}"


def test_a_burst_of_connections_spreads_over_the_workers(tmp_path, upstream_url):
    """64 connections at once, as the harness's wrk opens them: the kernel hashes each to a worker's
    socket, so each gets about half (fewer than 16 of 64 has odds of about 1 in 10,000)."""
    with gateway_process(tmp_path, upstream_url, {"KIT_GATEWAY_CREATE_KEYS_DB": "true"}) as gateway:
        workers = gateway.worker_pids()
        clients = _burst(gateway)
        deadline = time.monotonic() + 30
        while (owners := _owners(gateway, clients)).total() < CONNECTIONS and time.monotonic() < deadline:
            time.sleep(0.1)
        for client in clients:
            client.close()
    assert owners.total() == CONNECTIONS, f"only {owners.total()} of {CONNECTIONS} connections accepted"
    assert set(owners) == workers and min(owners.values()) >= 16, f"connections per worker: {dict(owners)}"


def test_a_worker_that_dies_is_replaced_and_the_gateway_keeps_answering(tmp_path, upstream_url):
    with gateway_process(tmp_path, upstream_url, {"KIT_GATEWAY_CREATE_KEYS_DB": "true"}) as gateway:
        before = gateway.worker_pids()
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = gateway.worker_pids()
            if len(now) == 2 and victim not in now:
                break
            time.sleep(0.2)
        assert len(now) == 2 and victim not in now, f"workers before {before}, now {now}"
        assert "starting another" in gateway.log_tail(200)
        clients = _burst(gateway)  # the new worker takes its share
        deadline = time.monotonic() + 30
        while (owners := _owners(gateway, clients)).total() < CONNECTIONS and time.monotonic() < deadline:
            time.sleep(0.1)
        for client in clients:
            client.close()
        assert set(owners) == now, f"connections per worker: {dict(owners)}"


def test_a_port_in_use_stops_the_gateway_with_the_reason(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"port: {port}\nworkers: 2\nkeys_db: {tmp_path / 'keys.sqlite'}\ncreate_keys_db: true\n"
    )
    env = {**os.environ, "KIT_GATEWAY_CONFIG": str(config)}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "serve.cli", "gateway"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        holder.close()
    assert done.returncode == 1, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "Address already in use" in done.stderr
    assert "Traceback" not in done.stderr
    assert not [p for p in psutil.Process().children(recursive=True) if "serve.cli" in " ".join(p.cmdline())]
