"""The gateway's outermost ASGI layer: request ids, routing, the access log, request metrics, and a
last-resort 500 in the API's error shape.

The pass-through routes are looked up in a dict and served by ``proxy.forward`` directly; everything
else (``/healthz``, ``/readyz``, ``/metrics``, 404s) goes to the FastAPI app behind. The access log line
holds no prompt text and no key: only the key's name. Lines are gathered and written as one log record
every 0.25 s, through a queue to a logging thread, so the event loop never writes to a file or a pipe.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.gateway import proxy
from serve.gateway.adapters_api import LOAD_PATH, UNLOAD_PATH, serve_adapters
from serve.gateway.errors import GatewayError, internal, send_error
from serve.gateway.logconfig import ACCESS_LOGGER
from serve.gateway.proxy import Call, Gateway
from serve.gateway.routes import ROUTES, USAGE_PATH, Route
from serve.gateway.usage_api import serve_usage

_quoted = json.encoder.encode_basestring  # type: ignore[attr-defined]
logger = logging.getLogger(ACCESS_LOGGER)
errors = logging.getLogger(__name__)

_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_OWN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_USAGE_ROUTE = Route(USAGE_PATH, "GET", generates=False, local=True)
_OWN_ROUTES = (
    _USAGE_ROUTE,
    Route(LOAD_PATH, "POST", generates=False, local=True),
    Route(UNLOAD_PATH, "POST", generates=False, local=True),
)


class RequestIds:
    """New request ids: UUIDv7s (RFC 9562, section 5.7) as 32 hex digits: 48 bits of Unix time in
    milliseconds, the version, 74 random bits (the variant's 2 bits among them).

    Time-ordered ids land at the end of the ledger's ``request_id`` index instead of all over it. Measured
    on a 1.5 M-row SQLite ledger, batches of 150 rows: 16-18 us of CPU per inserted row with these ids,
    44-49 us with random ones (half of it kernel time writing the index pages they scatter to the WAL).

    The random part comes from ``os.urandom`` (a CSPRNG, as RFC 9562 section 6.9 asks), drawn for
    ``POOL_IDS`` ids at a time with the version and variant bits already set: one system call per
    ``POOL_IDS`` requests, and the id is two byte strings joined and hex-encoded (0.46 us per id
    against 1.6 us for one ``os.urandom`` and integer arithmetic per id, timed 2026-12-05). One per
    worker process (a pool copied into a forked child would repeat its ids).
    """

    POOL_IDS = 256
    _SIZE = 10  # random bytes per id: rand_a (12 bits under the version) and rand_b (62 under the variant)

    __slots__ = ("_at", "_pool")

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def _refill(self) -> None:
        pool = bytearray(os.urandom(self._SIZE * self.POOL_IDS))
        pool[0 :: self._SIZE] = bytes(b & 0x0F | 0x70 for b in pool[0 :: self._SIZE])  # version 7
        pool[2 :: self._SIZE] = bytes(b & 0x3F | 0x80 for b in pool[2 :: self._SIZE])  # variant 0b10
        self._pool = bytes(pool)
        self._at = 0

    def new(self) -> str:
        """A new id."""
        if self._at >= len(self._pool):
            self._refill()
        at = self._at
        self._at = at + self._SIZE
        return ((time.time_ns() // 1_000_000).to_bytes(6, "big") + self._pool[at : at + self._SIZE]).hex()


def request_id_of(scope: Scope, ids: RequestIds) -> str:
    """The client's ``x-request-id`` when it is safe to log and forward, else a new one from ``ids``."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            return safe_request_id(value.decode("latin-1"), ids)
    return ids.new()


def safe_request_id(candidate: str | None, ids: RequestIds) -> str:
    """``candidate`` (the client's ``x-request-id``) when it is safe to log and forward: 1-128 letters,
    digits and ``._:-``; else a new id from ``ids``."""
    if candidate is not None and _SAFE_ID.fullmatch(candidate):
        return candidate
    return ids.new()


class GatewayApp:
    """The ASGI app uvicorn runs.

    Args:
        gateway: what the pass-through routes share.
        admin: the FastAPI app for the gateway's own endpoints (and the lifespan).
    """

    def __init__(self, gateway: Gateway, admin: ASGIApp) -> None:
        self.gateway = gateway
        self.admin = admin
        origins = gateway.settings.cors_allow_origins
        # Browsers' preflights and CORS headers, only where origins are allowed (Starlette's middleware).
        self.cors: ASGIApp | None = (
            CORSMiddleware(
                self.serve,
                allow_origins=origins,
                allow_methods=["GET", "POST"],
                allow_headers=["*"],
                expose_headers=["x-request-id", "retry-after"],
            )
            if origins
            else None
        )
        self.routes: dict[str, Route] = {r.path: r for r in (*ROUTES, *_OWN_ROUTES)}
        self.access_log: list[str] = []
        self.request_ids = RequestIds()  # one per app: one per worker process

    def flush(self) -> None:
        """Write the gathered access-log lines (one log record, a JSON object per line) and push the
        gathered metrics. The app calls it every 0.25 s and at shutdown."""
        lines, self.access_log = self.access_log, []
        if lines:
            logger.info("\n".join(lines))
        self.gateway.metrics.flush()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.cors is not None and scope["type"] == "http":
            await self.cors(scope, receive, send)
        else:
            await self.serve(scope, receive, send)

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route one request (``__call__`` puts the CORS layer in front when it is configured)."""
        if scope["type"] != "http":
            await self.admin(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope["path"]
        route = self.routes.get(path)
        if route is not None and not route.local and scope["method"] == route.method:
            passing = Call("", route, start, time.time())
            passing.request_id = safe_request_id(proxy.read_head(passing, scope["headers"]), self.request_ids)
            client = scope.get("client")
            if client:
                passing.client_ip = client[0]
            await self._forward(route, scope, receive, send, passing)
            return
        request_id = request_id_of(scope, self.request_ids)
        state: dict[str, Any] = {"status": 500, "bytes": 0, "started": False}
        id_header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["started"] = True
                message["headers"] = [*message.get("headers", []), id_header]
            elif message["type"] == "http.response.body":
                state["bytes"] += len(message.get("body", b""))
            await send(message)

        call: Call | None = None
        metrics = self.gateway.metrics
        metrics.in_flight_now += 1
        try:
            if route is not None and route.local and scope["method"] == route.method:
                call = Call(request_id, route, start, time.time())
                if route is _USAGE_ROUTE:
                    await serve_usage(self.gateway, call, scope, send_with_id)
                else:
                    await serve_adapters(self.gateway, call, scope, receive, send_with_id)
            elif route is not None:
                error = GatewayError(
                    405, f"Method {scope['method']} is not allowed on {path}.", code="method_not_allowed"
                )
                await send_error(send_with_id, route.api, error)
            else:
                scope.setdefault("state", {})["request_id"] = request_id
                await self.admin(scope, receive, send_with_id)
        except Exception:
            errors.exception("request %s failed", request_id)
            if not state["started"]:
                await send_error(send_with_id, route.api if route else "openai", internal(request_id))
        finally:
            metrics.in_flight_now -= 1
            elapsed = time.perf_counter() - start
            label = path if route is not None or path in _OWN_PATHS else "other"
            metrics.request_done(label, state["status"], elapsed)
            self._log(
                request_id,
                scope["method"],
                label if label != "other" else path[:200],
                state["status"],
                elapsed,
                state["bytes"],
                call,
            )

    async def _forward(self, route: Route, scope: Scope, receive: Receive, send: Send, call: Call) -> None:
        """A pass-through request: ``proxy.forward`` adds the request id to what it sends itself."""
        metrics = self.gateway.metrics
        metrics.in_flight_now += 1
        try:
            await proxy.forward(self.gateway, route, scope, receive, send, call)
        except Exception:
            errors.exception("request %s failed", call.request_id)
            if not call.response_started:
                call.status = 500
                await send_error(send, route.api, internal(call.request_id), call.id_header)
        finally:
            metrics.in_flight_now -= 1
            elapsed = time.perf_counter() - call.start
            metrics.request_done(route.path, call.status, elapsed)
            self._log(call.request_id, route.method, route.path, call.status, elapsed, call.sent_bytes, call)

    def _log(
        self,
        request_id: str,
        method: str,
        path: str,
        status: int,
        elapsed: float,
        sent: int,
        call: Call | None,
    ) -> None:
        """Queue the access-log line (JSON; the id and method are safe as they are, the rest is escaped)."""
        principal = call.principal if call is not None else None
        key = _quoted(principal.name) if principal is not None else "null"
        model = _quoted(call.model) if call is not None and call.model is not None else "null"
        stream = ("true" if call.stream else "false") if call is not None else "null"
        self.access_log.append(
            f'{{"request_id": "{request_id}", "method": {_quoted(method)}, "path": {_quoted(path)}, '
            f'"status": {status}, "duration_ms": {elapsed * 1000:.2f}, "bytes": {sent}, '
            f'"key": {key}, "model": {model}, "stream": {stream}}}'
        )
