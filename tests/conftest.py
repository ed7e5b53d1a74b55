"""Shared fixtures: the kit root, servers in background threads for gateway unit tests, a real Postgres."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvicorn
from aiohttp import web

from serve.gateway.app import create_app
from serve.gateway.keys import KeyPolicy, KeyStore
from serve.gateway.settings import GatewaySettings
from serve.supervisor import free_port
from tests.postgres import throwaway_postgres

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of a real PostgreSQL run for the session (tests/postgres.py); fails, never skips."""
    with throwaway_postgres() as server:
        yield server.url


class ThreadedAiohttp:
    """An aiohttp ``web.Application`` served on 127.0.0.1 from a background thread."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._runner: web.AppRunner | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._runner = web.AppRunner(self.app)
        self.loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self.loop.run_until_complete(site.start())
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self._runner.cleanup())

    def start(self) -> ThreadedAiohttp:
        self._thread.start()
        assert self._ready.wait(10), "fake upstream did not start"
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class ThreadedGateway:
    """The real gateway app under uvicorn in a background thread."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.port}"
        config = uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=settings.port,
            loop="asyncio",
            log_level="warning",
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> ThreadedGateway:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)


@pytest.fixture
def serve_aiohttp() -> Iterator[Callable[[web.Application], ThreadedAiohttp]]:
    started: list[ThreadedAiohttp] = []

    def start(app: web.Application) -> ThreadedAiohttp:
        server = ThreadedAiohttp(app).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., tuple[ThreadedGateway, str]]]:
    """Start a gateway in front of ``upstream_url``; returns it and a valid key (key name ``tester``, with
    ``policy``'s limits when given)."""
    started: list[ThreadedGateway] = []

    def start(
        upstream_url: str, *, policy: KeyPolicy | None = None, **overrides: object
    ) -> tuple[ThreadedGateway, str]:
        keys_db = tmp_path / f"keys-{len(started)}.sqlite"
        key = KeyStore(keys_db).create("tester", policy)
        settings = GatewaySettings(upstream_url=upstream_url, port=free_port(), keys_db=keys_db, **overrides)
        gateway = ThreadedGateway(settings).start()
        started.append(gateway)
        return gateway, key

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def down_upstream_url() -> Iterator[str]:
    """The URL of an upstream that refuses connections: a port held bound (not listening) for the test, so
    no gateway the test starts can be given the same port and end up proxying to itself."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
