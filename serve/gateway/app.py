"""The gateway app: ``create_app(settings)`` builds it; ``create_app_from_env`` is the uvicorn factory.

Run: ``kit gateway`` (or ``make gateway``), which starts uvicorn with uvloop/httptools and N workers.
The pass-through routes are plain ASGI (``access.GatewayApp`` -> ``proxy.forward``); the gateway's own
endpoints (``/healthz``, ``/readyz``, ``/metrics``) are a small FastAPI app behind it, which also runs
the lifespan: the upstream session, the ledger writer and the access log's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import logging.handlers
import queue
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve.gateway.access import GatewayApp
from serve.gateway.errors import GatewayError, error_body, unavailable
from serve.gateway.gc_policy import tune_gc
from serve.gateway.keys import KeyCache, KeyStore
from serve.gateway.ledger import LedgerWriter
from serve.gateway.limits import RECALL_POLL_S, Limiter, LocalLimiter, windows
from serve.gateway.logconfig import ACCESS_LOGGER
from serve.gateway.metrics import GatewayMetrics
from serve.gateway.proxy import Gateway
from serve.gateway.settings import GatewaySettings
from serve.gateway.shared_counters import SharedCounters
from serve.gateway.usage_report import usage_in_windows


class MissingDatabase(RuntimeError):
    """The configured SQLite key database does not exist and the settings do not allow creating it."""


def _open_session(settings: GatewaySettings) -> aiohttp.ClientSession:
    connector: aiohttp.BaseConnector
    if settings.upstream_uds is not None:
        connector = aiohttp.UnixConnector(
            path=str(settings.upstream_uds), limit=settings.upstream_max_connections, keepalive_timeout=60
        )
    else:
        connector = aiohttp.TCPConnector(limit=settings.upstream_max_connections, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(
        total=None, connect=settings.upstream_connect_timeout_s, sock_read=settings.upstream_read_timeout_s
    )
    # auto_decompress off: bytes go to the client exactly as the upstream sent them.
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)


def _error(error: GatewayError) -> Response:
    return Response(error.body("openai"), error.status, headers=error.headers, media_type="application/json")


async def healthz(request: Request) -> Response:
    """The gateway process is alive (says nothing about the model server)."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready when the upstream's health path (``upstream_health_path``, ``/health``; skipped when unset)
    answers 200 and ``/v1/models`` lists the served models.

    It names no model: the listing is for callers with a key (``/v1/models``)."""
    gateway: Gateway = request.app.state.gateway
    assert gateway.session is not None
    base = gateway.settings.upstream_base
    retry = gateway.settings.retry_after_s
    health_path = gateway.settings.upstream_health_path
    try:
        if health_path is not None:
            async with gateway.session.get(base + health_path) as health:
                if health.status != 200:
                    return _error(unavailable(f"health is {health.status}", retry, "upstream_not_ready"))
        async with gateway.session.get(base + "/v1/models", headers=gateway.upstream_headers) as listing:
            models = [m["id"] for m in (await listing.json()).get("data", [])]
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
        return _error(unavailable("not reachable", retry))
    missing = [m for m in gateway.settings.served_model_names if m not in models]
    if missing:
        return _error(
            unavailable(f"it does not list {len(missing)} of the served models", retry, "model_not_loaded")
        )
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    """Prometheus exposition of the gateway's metrics (behind ``metrics_key`` when one is set)."""
    gateway: Gateway = request.app.state.gateway
    required = gateway.settings.metrics_key
    if required is not None:
        given = request.headers.get("authorization", "")
        expected = "Bearer " + required.get_secret_value()
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return _error(
                GatewayError(
                    401,
                    "/metrics needs 'Authorization: Bearer <metrics_key>' (setting metrics_key).",
                    code="invalid_api_key",
                    headers={"www-authenticate": "Bearer"},
                )
            )
    payload, content_type = gateway.metrics.render()
    return Response(payload, media_type=content_type)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message, code = f"No route {request.url.path} on this gateway.", "not_found"
    elif exc.status_code == 405:
        message, code = f"Method {request.method} is not allowed on {request.url.path}.", "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    body = error_body("openai", exc.status_code, message, "invalid_request_error", code)
    return Response(body, exc.status_code, media_type="application/json")


# Seconds between writes of the gathered access-log lines and metric updates.
FLUSH_INTERVAL_S = 0.25


@asynccontextmanager
async def _every(interval_s: float, job: Callable[[], None]) -> AsyncIterator[None]:
    """Run ``job`` every ``interval_s`` seconds while the context is open, and once more at its end."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval_s)
            job()

    task = asyncio.get_running_loop().create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        job()


@asynccontextmanager
async def _access_log_thread() -> AsyncIterator[None]:
    """Route the access logger through a queue to a thread that does the writing."""
    access = logging.getLogger(ACCESS_LOGGER)
    handlers = list(access.handlers)
    if not handlers:
        yield
        return
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, *handlers, respect_handler_level=True)
    access.handlers = [logging.handlers.QueueHandler(records)]
    listener.start()
    try:
        yield
    finally:
        listener.stop()
        access.handlers = handlers


def create_app(settings: GatewaySettings) -> GatewayApp:
    """Build the gateway.

    Only ``/healthz``, ``/readyz``, ``/metrics``, ``/v1/usage`` and the allowlisted pass-through routes
    exist; every other path answers 404 in the OpenAI error envelope (no docs or OpenAPI routes either).

    Args:
        settings: validated gateway settings.

    Returns:
        The ASGI app. Its upstream ``aiohttp.ClientSession`` and ledger writer open and close with the
        app's lifespan.

    Raises:
        MissingDatabase: the SQLite file does not exist and ``create_keys_db`` is off.
    """
    if settings.database_url is None and not settings.keys_db.exists() and not settings.create_keys_db:
        raise MissingDatabase(
            f"the gateway's key database {settings.keys_db} does not exist: create a key first "
            "(make key NAME=...), point keys_db / KIT_GATEWAY_KEYS_DB at the right file, or set "
            "create_keys_db: true to start with an empty one"
        )
    store = KeyStore(settings.database, settings.key_cache_ttl_s, create=settings.create_keys_db)
    engine = store.engine
    limiter: Limiter | LocalLimiter
    if settings.limits_in_memory:
        counters = SharedCounters(
            settings.counters_file,
            seed=lambda: usage_in_windows(engine, time.time()),
            windows=windows(time.time()),
        )
        limiter = LocalLimiter(counters)
    else:
        limiter = Limiter(engine, settings.max_request_s)
    gateway = Gateway(
        settings=settings,
        keys=KeyCache(store),
        limiter=limiter,
        ledger=LedgerWriter(engine, settings.keys_db.parent, settings.ledger_flush_interval_s),
        metrics=GatewayMetrics(),
        engine=engine,
    )
    if settings.upstream_api_key is not None:
        gateway.upstream_headers["authorization"] = f"Bearer {settings.upstream_api_key.get_secret_value()}"

    app: GatewayApp | None = None

    @asynccontextmanager
    async def lifespan(admin: FastAPI) -> AsyncIterator[None]:
        assert app is not None
        gateway.session = _open_session(settings)
        gateway.ledger.start()
        limiter = gateway.limiter
        # Leases asked back by other workers, idle or of a past window go back within RECALL_POLL_S.
        leases = (
            _every(RECALL_POLL_S, limiter.tick)
            if isinstance(limiter, LocalLimiter)
            else contextlib.nullcontext()
        )
        watchdog = gateway.watchdog
        async with (
            _access_log_thread(),
            _every(FLUSH_INTERVAL_S, app.flush),
            _every(watchdog.tick_s, watchdog.sweep),
            leases,
        ):
            try:
                yield
            finally:
                await gateway.ledger.close()
                await gateway.session.close()
                gateway.session = None
        if isinstance(limiter, LocalLimiter):
            limiter.give_back_all()
            limiter.counters.close()

    admin = FastAPI(
        title="openweights-kit gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    admin.state.gateway = gateway
    admin.add_exception_handler(StarletteHTTPException, _http_error)
    admin.add_route("/healthz", healthz, methods=["GET"])
    admin.add_route("/readyz", readyz, methods=["GET"])
    admin.add_route("/metrics", metrics, methods=["GET"])
    app = GatewayApp(gateway, admin)
    return app


def create_app_from_env() -> GatewayApp:
    """uvicorn factory, run once in each worker process: settings from ``KIT_GATEWAY_CONFIG`` and
    ``KIT_GATEWAY_*`` variables; the worker's garbage collector is tuned once the app is built
    (``gc_gen0_threshold``, serve/gateway/gc_policy.py)."""
    settings = GatewaySettings()
    app = create_app(settings)
    tune_gc(settings.gc_gen0_threshold)
    return app
