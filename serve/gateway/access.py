"""Request ids, access log and request metrics, as one pure ASGI middleware (cheaper than Starlette's
``BaseHTTPMiddleware``). The log line holds no prompt text and no key: only the key's name."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.gateway.logconfig import ACCESS_LOGGER
from serve.gateway.metrics import GatewayMetrics

logger = logging.getLogger(ACCESS_LOGGER)

_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class AccessLogMiddleware:
    """Adds ``x-request-id`` (the client's if it is safe, else a new one), logs one JSON line per request
    and records count, latency and in-flight metrics.

    Args:
        app: the wrapped ASGI app.
        metrics: where request metrics go.
        routes: paths used as metric labels as they are; every other path is labelled ``other`` so
            label values stay bounded.
    """

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, routes: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                request_id = candidate if _SAFE_ID.fullmatch(candidate) else None
                break
        request_id = request_id or uuid.uuid4().hex
        info: dict[str, Any] = scope.setdefault("state", {}).setdefault("kit", {})
        status = 500
        sent_bytes = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status, sent_bytes
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            elif message["type"] == "http.response.body":
                sent_bytes += len(message.get("body", b""))
            await send(message)

        path = scope["path"]
        route = path if path in self.routes else "other"
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - start
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            logger.info(
                json.dumps(
                    {
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": route if route != "other" else path[:200],
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                        "bytes": sent_bytes,
                        "key": info.get("key"),
                        "model": info.get("model"),
                        "stream": info.get("stream"),
                    }
                )
            )
