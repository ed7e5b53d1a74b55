"""Run the gateway's uvicorn workers, each listening on its own ``SO_REUSEPORT`` socket.

uvicorn's own supervisor (``uvicorn.run(workers=N)``, uvicorn 0.54 ``main.py`` and
``supervisors/multiprocess.py``) binds one socket and hands it to every worker. The worker whose event
loop wakes first then accepts every connection waiting (libuv accepts until the queue is empty), so a
burst of keep-alive connections (an SDK's pool, a load balancer's) can all land on one worker while the
others idle: measured with the maintainers' harness on 2026-12-04, one of two workers held all 64
connections in 3 of 6 runs (README, "Gateway speed"). With a listening socket per worker in one
``SO_REUSEPORT`` group, Linux picks the socket for each new connection by a hash of its addresses
(socket(7), ``SO_REUSEPORT``), so connections spread evenly.

What uvicorn's supervisor does, this one does too: start the workers (spawned, so each builds the app
afresh from ``create_app_from_env``), restart one that dies, and on SIGTERM or SIGINT pass SIGTERM on so
each drains within ``timeout_graceful_shutdown``. A worker that exits before it finished starting (its
lifespan ran: uvicorn's ``Server.started``) stops them all instead of being restarted in a loop.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.process
import signal
import socket
import threading
import time
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

_POLL_S = 0.5


class WorkersFailed(RuntimeError):
    """A worker exited before it finished starting; every worker has been stopped."""


def reuse_port_supported() -> bool:
    """Whether this platform has ``SO_REUSEPORT`` (Linux and the BSDs; not Windows)."""
    return hasattr(socket, "SO_REUSEPORT")


def bind_reuse_port(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEADDR`` and ``SO_REUSEPORT`` set, not listening.

    Raises:
        OSError: the address cannot be bound (in use by a socket outside the group, not local, ...).
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _serve(config_kwargs: dict[str, Any], ready: Any) -> None:
    """One worker process: its own socket in the group, then uvicorn until it is told to stop; sets the
    ``ready`` event once uvicorn has started (as uvicorn's supervisor asks ``Server.started``)."""
    import uvicorn

    sock = bind_reuse_port(config_kwargs["host"], config_kwargs["port"])
    server = uvicorn.Server(uvicorn.Config(**config_kwargs))

    def report() -> None:
        while not server.started:
            time.sleep(0.05)
        ready.set()

    threading.Thread(target=report, daemon=True).start()
    server.run(sockets=[sock])


def run_workers(config_kwargs: dict[str, Any], workers: int, stop_timeout_s: float) -> None:
    """Run ``workers`` uvicorn processes with ``uvicorn.Config(**config_kwargs)`` (``host`` and ``port``
    among them) until SIGTERM or SIGINT, then stop them.

    Args:
        config_kwargs: keyword arguments of ``uvicorn.Config`` (picklable: an import string for the app).
        workers: worker processes (>= 1).
        stop_timeout_s: how long to wait for the workers to drain after SIGTERM before killing them
            (``timeout_graceful_shutdown`` plus a margin).

    Raises:
        OSError: the address cannot be bound, checked here before any worker starts.
        WorkersFailed: a worker exited before it finished starting.
    """
    # Held until the end: the address is checked once, with a clear error, before any worker starts (a
    # bound socket that does not listen takes no connections).
    probe = bind_reuse_port(config_kwargs["host"], config_kwargs["port"])
    context = multiprocessing.get_context("spawn")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def start() -> tuple[multiprocessing.process.BaseProcess, Any]:
        ready = context.Event()
        process = context.Process(target=_serve, args=(config_kwargs, ready), name="kit-gateway-worker")
        process.start()
        return process, ready

    running = [start() for _ in range(workers)]
    failed: str | None = None
    try:
        while not stop.wait(_POLL_S):
            for at, (process, ready) in enumerate(running):
                if process.is_alive():
                    continue
                if not ready.is_set():
                    failed = f"gateway worker {process.pid} exited with {process.exitcode} while starting"
                    stop.set()
                    break
                logger.warning(
                    "gateway worker %s exited with %s; starting another", process.pid, process.exitcode
                )
                running[at] = start()
    finally:
        for process, _ in running:
            if process.is_alive():
                process.terminate()  # SIGTERM: uvicorn drains for timeout_graceful_shutdown
        deadline = time.monotonic() + stop_timeout_s
        for process, _ in running:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                logger.warning(
                    "gateway worker %s did not stop in %.0f s; killing it", process.pid, stop_timeout_s
                )
                process.kill()
                process.join()
        probe.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed is not None:
        raise WorkersFailed(failed)
