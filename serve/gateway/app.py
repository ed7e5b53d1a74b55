"""The gateway app: ``create_app(settings)`` builds it; ``create_app_from_env`` is the uvicorn factory.

Run: ``kit gateway`` (or ``make gateway``), which starts uvicorn with uvloop/httptools and N workers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve.gateway.access import AccessLogMiddleware
from serve.gateway.errors import error_response
from serve.gateway.keys import KeyStore
from serve.gateway.metrics import GatewayMetrics
from serve.gateway.proxy import ROUTES, Gateway, make_endpoint, unavailable
from serve.gateway.settings import GatewaySettings


def _open_session(settings: GatewaySettings) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=settings.upstream_max_connections, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(
        total=None, connect=settings.upstream_connect_timeout_s, sock_read=settings.upstream_read_timeout_s
    )
    # auto_decompress off: bytes go to the client exactly as the upstream sent them.
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)


async def healthz(request: Request) -> Response:
    """The gateway process is alive (says nothing about the model server)."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready when the upstream's ``/health`` answers 200 and ``/v1/models`` lists the served models."""
    gateway: Gateway = request.app.state.gateway
    assert gateway.session is not None
    base = gateway.settings.upstream_base
    try:
        async with gateway.session.get(base + "/health") as health:
            if health.status != 200:
                return unavailable(gateway, f"health is {health.status}", "upstream_not_ready")
        async with gateway.session.get(base + "/v1/models", headers=gateway.upstream_headers) as listing:
            models = [m["id"] for m in (await listing.json()).get("data", [])]
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
        return unavailable(gateway, "not reachable")
    missing = [m for m in gateway.settings.served_model_names if m not in models]
    if missing:
        return unavailable(gateway, f"it does not list {missing}", "model_not_loaded")
    return JSONResponse({"status": "ready", "models": models})


async def metrics(request: Request) -> Response:
    """Prometheus exposition of the gateway's metrics."""
    gateway: Gateway = request.app.state.gateway
    payload, content_type = gateway.metrics.render()
    return Response(payload, media_type=content_type)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return error_response(
            404, f"No route {request.url.path} on this gateway.", "invalid_request_error", "not_found"
        )
    if exc.status_code == 405:
        return error_response(
            405,
            f"Method {request.method} is not allowed on {request.url.path}.",
            "invalid_request_error",
            "method_not_allowed",
        )
    return error_response(exc.status_code, str(exc.detail), "invalid_request_error")


def create_app(settings: GatewaySettings) -> FastAPI:
    """Build the gateway.

    Only ``/healthz``, ``/readyz``, ``/metrics`` and the allowlisted pass-through routes exist; every
    other path answers 404 in the OpenAI error envelope (no docs or OpenAPI routes either).

    Args:
        settings: validated gateway settings.

    Returns:
        The ASGI app. Its upstream ``aiohttp.ClientSession`` opens and closes with the app's lifespan.
    """
    gateway = Gateway(
        settings=settings, keys=KeyStore(settings.keys_db, settings.key_cache_ttl_s), metrics=GatewayMetrics()
    )
    if settings.upstream_api_key is not None:
        gateway.upstream_headers["authorization"] = f"Bearer {settings.upstream_api_key.get_secret_value()}"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway.session = _open_session(settings)
        try:
            yield
        finally:
            await gateway.session.close()
            gateway.session = None

    app = FastAPI(
        title="openweights-kit gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.gateway = gateway
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_route("/healthz", healthz, methods=["GET"])
    app.add_route("/readyz", readyz, methods=["GET"])
    app.add_route("/metrics", metrics, methods=["GET"])
    for route in ROUTES:
        app.add_route(route.path, make_endpoint(route), methods=[route.method])
    app.add_middleware(
        AccessLogMiddleware,
        metrics=gateway.metrics,
        routes=frozenset(r.path for r in ROUTES) | {"/healthz", "/readyz", "/metrics"},
    )
    return app


def create_app_from_env() -> FastAPI:
    """uvicorn factory: settings from ``KIT_GATEWAY_CONFIG`` and ``KIT_GATEWAY_*`` variables."""
    return create_app(GatewaySettings())
