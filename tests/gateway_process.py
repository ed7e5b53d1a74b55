"""The real gateway as a subprocess (``python -m serve.cli gateway``, uvicorn with several workers), for
tests that need what a thread cannot give: more than one worker process sharing the limits and the ledger.

    with gateway_process(tmp_path, upstream.url, {"KIT_GATEWAY_KEYS_DB": str(db)}) as gateway:
        httpx.get(gateway.url + "/healthz")
        for connection in gateway.connections_per_worker(4):  # 4 keep-alive connections to each worker
            connection.post("/v1/chat/completions", {...}, {"authorization": f"Bearer {key}"})

Keys are created beforehand with ``KeyStore(path).create(...)`` on the same database. The gateway runs in
its own process group, and ``stop`` sends SIGTERM to the whole group (SIGKILL if it is still alive after
a grace period), so no worker outlives the test. Its stdout and stderr (the JSON access log included) go
to ``<tmp_path>/gateway-<n>.log``; a gateway that does not come up fails the test with that log's tail.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from serve.supervisor import free_port

ROOT = Path(__file__).resolve().parent.parent
# Two workers import FastAPI, SQLAlchemy and aiohttp: ~10 s on 2 busy cores; the margin is for a loaded CI.
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0  # past the 5 s graceful shutdown these gateways get (KIT_GATEWAY_SHUTDOWN_TIMEOUT_S)
BATCH = 16  # connections opened at once by connections_per_worker (at once: the kernel spreads them)


def _local_port(conn: http.client.HTTPConnection) -> int:
    assert conn.sock is not None, "the connection is not open"
    return int(conn.sock.getsockname()[1])


@dataclass(frozen=True)
class Reply:
    """A response read whole: status, headers (names lower-cased) and the JSON body (None if not JSON)."""

    status: int
    headers: dict[str, str]
    body: Any


@dataclass(frozen=True)
class WorkerConnection:
    """A keep-alive connection to the gateway and the pid of the worker that accepted it."""

    conn: http.client.HTTPConnection
    pid: int

    def post(self, path: str, payload: dict[str, Any], headers: Mapping[str, str]) -> Reply:
        """POST ``payload`` as JSON on this connection, so to this worker, and read the whole answer.

        Raises:
            AssertionError: the connection was closed before (http.client would silently open a new one,
                which may reach the other worker).
        """
        assert self.conn.sock is not None, f"the connection to worker {self.pid} was closed"
        self.conn.request("POST", path, json.dumps(payload), {"content-type": "application/json", **headers})
        response = self.conn.getresponse()
        raw = response.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, body)


@dataclass
class GatewayProcess:
    """A running gateway subprocess.

    Attributes:
        url: ``http://127.0.0.1:<port>``.
        port: the port it listens on.
        process: the ``serve.cli gateway`` process (uvicorn's supervisor; the workers are its children).
        log: its stdout + stderr.
        workers: how many uvicorn workers it runs.
    """

    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    workers: int
    _connections: list[http.client.HTTPConnection] = field(default_factory=list)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the gateway's output."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as err:
            return f"(no log: {err})"

    def worker_pids(self) -> set[int]:
        """The pids of the uvicorn workers (children of the supervisor, multiprocessing helpers aside)."""
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return set()
        return {c.pid for c in children if _holds_listener(c, self.port)}

    def workers_of(self, ports: Iterable[int]) -> dict[int, int]:
        """For client connections from the local ``ports``: the pid of the worker holding each one's
        server side (ports whose connection no worker holds any more are left out)."""
        wanted = set(ports)
        found: dict[int, int] = {}
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.process.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    for conn in child.net_connections(kind="tcp"):
                        if conn.laddr.port == self.port and conn.raddr and conn.raddr.port in wanted:
                            found[conn.raddr.port] = child.pid
        return found

    def connections_per_worker(self, per_worker: int, timeout_s: float = 30.0) -> list[WorkerConnection]:
        """Open keep-alive connections until each worker holds ``per_worker`` of them.

        Connections are opened in batches, each sending ``GET /healthz``, so that every one has been
        accepted by a worker; which worker is the kernel's choice, so surplus ones are closed. Use them
        within a few seconds: uvicorn closes a connection idle for 5 s (its ``timeout_keep_alive``).

        Returns:
            ``per_worker`` connections for each worker; closed by ``stop`` at the latest.

        Raises:
            AssertionError: some worker took fewer within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        kept: dict[int, list[http.client.HTTPConnection]] = defaultdict(list)
        while True:
            batch = [http.client.HTTPConnection("127.0.0.1", self.port, timeout=60) for _ in range(BATCH)]
            self._connections += batch
            for conn in batch:
                conn.request("GET", "/healthz")
            for conn in batch:
                response = conn.getresponse()
                response.read()
                assert response.status == 200, response.status
            owners = self.workers_of(_local_port(c) for c in batch)
            for conn in batch:
                pid = owners.get(_local_port(conn))
                if pid is not None and len(kept[pid]) < per_worker:
                    kept[pid].append(conn)
                else:
                    conn.close()
            if len(kept) == self.workers and all(len(c) == per_worker for c in kept.values()):
                return [WorkerConnection(c, pid) for pid, conns in kept.items() for c in conns]
            assert time.monotonic() < deadline, (
                f"in {timeout_s:.0f} s the workers took { ({p: len(c) for p, c in kept.items()}) } "
                f"connections, not {per_worker} each of {self.workers}; log:\n{self.log_tail()}"
            )

    def stop(self) -> None:
        """SIGTERM the gateway's process group and wait; SIGKILL what is left of the group after that."""
        for conn in self._connections:
            conn.close()
        self._connections.clear()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(STOP_TIMEOUT_S)
        # Workers share the group: none may outlive the supervisor, whether it exited or hangs.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(STOP_TIMEOUT_S)


def _holds_listener(process: psutil.Process, port: int) -> bool:
    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
        return any(
            c.status == psutil.CONN_LISTEN and c.laddr.port == port
            for c in process.net_connections(kind="tcp")
        )
    return False


def start_gateway_process(
    tmp_path: Path, upstream_url: str, env_extra: Mapping[str, str] | None = None, workers: int = 2
) -> GatewayProcess:
    """Start ``python -m serve.cli gateway`` in front of ``upstream_url`` and wait until every worker
    answers ``/healthz``.

    Args:
        tmp_path: where its config and log go; ``KIT_GATEWAY_KEYS_DB`` defaults to ``tmp_path/gw.sqlite``
            (create keys there first: the gateway refuses to start without the file).
        upstream_url: the (fake) vLLM.
        env_extra: more ``KIT_GATEWAY_*`` variables (e.g. ``KIT_GATEWAY_DATABASE_URL``); they win.
        workers: uvicorn worker processes.

    Returns:
        The running gateway; call ``stop`` (or use ``gateway_process``).
    """
    port = free_port()
    config = tmp_path / "gateway-test.yaml"
    # An own YAML: the shipped configs/gateway.yaml (edited by others) does not change what is tested.
    config.write_text("log_level: INFO\n")
    env = {
        **os.environ,
        "KIT_GATEWAY_CONFIG": str(config),
        "KIT_GATEWAY_UPSTREAM_URL": upstream_url,
        "KIT_GATEWAY_HOST": "127.0.0.1",
        "KIT_GATEWAY_PORT": str(port),
        "KIT_GATEWAY_WORKERS": str(workers),
        "KIT_GATEWAY_KEYS_DB": str(tmp_path / "gw.sqlite"),
        "KIT_GATEWAY_SHUTDOWN_TIMEOUT_S": "5",
        **(env_extra or {}),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the gateway makes its own for several workers
    log = tmp_path / f"gateway-{len(list(tmp_path.glob('gateway-*.log')))}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "serve.cli", "gateway"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() signals the workers too
        )
    gateway = GatewayProcess(f"http://127.0.0.1:{port}", port, process, log, workers)
    try:
        _wait_ready(gateway)
    except BaseException:
        gateway.stop()
        raise
    return gateway


def _wait_ready(gateway: GatewayProcess) -> None:
    """Until ``/healthz`` answers and every worker has finished starting (its lifespan ran)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if gateway.process.poll() is not None:
            pytest.fail(
                f"the gateway exited with {gateway.process.returncode} on start; its log:\n"
                + gateway.log_tail(),
                pytrace=False,
            )
        started = gateway.log.read_text(errors="replace").count("Application startup complete")
        if started >= gateway.workers:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(gateway.url + "/healthz", timeout=5).status_code == 200:
                    return
        if time.monotonic() > deadline:
            pytest.fail(
                f"the gateway was not ready within {START_TIMEOUT_S:.0f} s; its log:\n{gateway.log_tail()}",
                pytrace=False,
            )
        time.sleep(0.1)


@contextlib.contextmanager
def gateway_process(
    tmp_path: Path, upstream_url: str, env_extra: Mapping[str, str] | None = None, workers: int = 2
) -> Iterator[GatewayProcess]:
    """``start_gateway_process`` as a context manager: the gateway is stopped however the block ends."""
    gateway = start_gateway_process(tmp_path, upstream_url, env_extra, workers)
    try:
        yield gateway
    finally:
        gateway.stop()
