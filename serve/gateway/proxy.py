"""The pass-through routes: authenticate, read the body once, forward bytes both ways.

These are plain Starlette endpoints (no FastAPI dependency layer, no pydantic models) because they sit on
the path of every token. Upstream bytes are forwarded as they arrive, never re-encoded; the request body
is parsed at most once, only to learn ``model`` and ``stream``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from serve.gateway.errors import error_response, stream_error_event
from serve.gateway.keys import KeyStore
from serve.gateway.metrics import GatewayMetrics
from serve.gateway.settings import GatewaySettings
from serve.gateway.usage import UsageCounter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """One allowlisted upstream route. ``api`` picks the stream error framing."""

    path: str
    method: str
    api: str


# The only upstream paths a client can reach. vLLM leaves /invocations, /pause, /update_weights,
# /v1/load_lora_adapter... unauthenticated even with --api-key (shared/reference/qwen3.6-27b.md).
ROUTES = (
    Route("/v1/chat/completions", "POST", "openai"),
    Route("/v1/completions", "POST", "openai"),
    Route("/v1/responses", "POST", "openai"),
    Route("/v1/models", "GET", "openai"),
    Route("/v1/messages", "POST", "anthropic"),
    Route("/v1/messages/count_tokens", "POST", "anthropic"),
)

_FORWARD_REQUEST_HEADERS = ("content-type", "accept", "anthropic-version", "anthropic-beta")
_SSE = "text/event-stream"


@dataclass
class Gateway:
    """What the pass-through routes share, built in ``create_app`` and opened in its lifespan."""

    settings: GatewaySettings
    keys: KeyStore
    metrics: GatewayMetrics
    session: aiohttp.ClientSession | None = None
    upstream_headers: dict[str, str] = field(default_factory=dict)


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth and auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def _unauthorized() -> Response:
    return error_response(
        401,
        "Missing or invalid API key. Send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'; "
        "an admin creates keys with `make key NAME=...`.",
        "invalid_request_error",
        "invalid_api_key",
        headers={"www-authenticate": "Bearer"},
    )


def _too_large(limit: int) -> Response:
    return error_response(
        413,
        f"Request body is larger than the gateway's limit of {limit} bytes (setting max_body_bytes).",
        "invalid_request_error",
        "request_too_large",
    )


def unavailable(gateway: Gateway, detail: str, code: str = "upstream_unavailable") -> Response:
    """503 with ``Retry-After``: the model server is down, starting, or missing the model."""
    return error_response(
        503,
        f"The model server is not available ({detail}); retry shortly.",
        "service_unavailable",
        code,
        headers={"retry-after": str(gateway.settings.retry_after_s)},
    )


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The whole request body, or None once it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _request_object(body: bytes) -> dict[str, Any] | None:
    """The JSON object of a body; None for anything else, which goes upstream unchanged and vLLM answers
    with its own 400."""
    if not body:
        return None
    try:
        obj: Any = json.loads(body)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def with_template_defaults(obj: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any] | None:
    """``obj`` with ``defaults`` under the ``chat_template_kwargs`` keys it does not set; None when
    nothing changes (the body is then forwarded byte for byte)."""
    given = obj.get("chat_template_kwargs")
    if given is None:
        given = {}
    if not isinstance(given, dict):
        return None  # vLLM reports the malformed field itself
    merged = {**defaults, **given}
    if merged == given:
        return None
    return {**obj, "chat_template_kwargs": merged}


def without_server_paths(payload: bytes) -> bytes:
    """A ``/v1/models`` body with each model's ``root`` (vLLM puts the model's or adapter's folder on the
    server there) replaced by its id: API clients need not learn the server's file layout. Anything
    that is not the expected JSON passes unchanged."""
    try:
        listing = json.loads(payload)
    except ValueError:
        return payload
    models = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(models, list):
        return payload
    for entry in models:
        if isinstance(entry, dict) and "root" in entry and "id" in entry:
            entry["root"] = entry["id"]
    return json.dumps(listing).encode()


def make_endpoint(route: Route) -> Callable[[Request], Awaitable[Response]]:
    """The Starlette endpoint that forwards ``route`` to the upstream."""

    async def endpoint(request: Request) -> Response:
        gateway: Gateway = request.app.state.gateway
        info: dict[str, Any] = request.scope.setdefault("state", {}).setdefault("kit", {})
        presented = _presented_key(request)
        key_name = gateway.keys.lookup(presented) if presented else None
        if key_name is None:
            return _unauthorized()
        info["key"] = key_name
        body = await _read_body(request, gateway.settings.max_body_bytes)
        if body is None:
            return _too_large(gateway.settings.max_body_bytes)
        obj = _request_object(body)
        model = obj.get("model") if obj is not None else None
        model = model if isinstance(model, str) else None
        info["model"] = model
        info["stream"] = obj is not None and obj.get("stream") is True
        defaults = gateway.settings.default_chat_template_kwargs.get(model or "")
        if defaults and obj is not None and route.path == "/v1/chat/completions":
            changed = with_template_defaults(obj, defaults)
            if changed is not None:
                body = json.dumps(changed).encode()
        headers = {h: v for h in _FORWARD_REQUEST_HEADERS if (v := request.headers.get(h)) is not None}
        headers.update(gateway.upstream_headers)
        url = gateway.settings.upstream_base + route.path
        if request.url.query:
            url += "?" + request.url.query
        assert gateway.session is not None, "the gateway session opens in the app's lifespan"
        try:
            upstream = await gateway.session.request(route.method, url, data=body or None, headers=headers)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            gateway.metrics.upstream_errors.labels("connect").inc()
            logger.warning("upstream unreachable: %s", exc.__class__.__name__)
            return unavailable(gateway, "connection refused or timed out")
        content_type = upstream.headers.get("content-type", "application/json")
        if upstream.status >= 400 or not content_type.startswith(_SSE):
            try:
                payload = await upstream.read()
            except (aiohttp.ClientError, TimeoutError):
                gateway.metrics.upstream_errors.labels("read").inc()
                return unavailable(gateway, "the response broke off")
            finally:
                upstream.release()
            if upstream.status >= 500:
                gateway.metrics.upstream_errors.labels("status").inc()
            if upstream.status < 400:
                usage = UsageCounter()
                usage.feed_body(payload)
                _record_usage(gateway, model, usage)
            if route.path == "/v1/models" and upstream.status == 200:
                payload = without_server_paths(payload)
            # Upstream error bodies pass through unchanged, status and content type included.
            return Response(payload, upstream.status, media_type=content_type)
        return StreamingResponse(
            _relay(gateway, upstream, route.api, model), upstream.status, media_type=content_type
        )

    endpoint.__name__ = "proxy_" + route.path.strip("/").replace("/", "_")
    return endpoint


def _record_usage(gateway: Gateway, model: str | None, usage: UsageCounter) -> None:
    label = model or "unknown"
    if usage.prompt:
        gateway.metrics.tokens.labels(label, "prompt").inc(usage.prompt)
    if usage.completion:
        gateway.metrics.tokens.labels(label, "completion").inc(usage.completion)


async def _relay(
    gateway: Gateway, upstream: aiohttp.ClientResponse, api: str, model: str | None
) -> AsyncIterator[bytes]:
    """Yield the upstream's SSE bytes as they arrive.

    If the upstream breaks mid-stream, end with an error event (never a normal finish). If the client
    goes away, Starlette cancels this generator and ``finally`` closes the upstream connection, which
    makes vLLM abort the request.
    """
    usage = UsageCounter()
    try:
        async for chunk in upstream.content.iter_any():
            usage.feed_sse(chunk)
            yield chunk
    except asyncio.CancelledError:
        gateway.metrics.client_disconnects.inc()
        raise
    except (aiohttp.ClientError, TimeoutError) as exc:
        gateway.metrics.upstream_errors.labels("stream").inc()
        logger.warning("upstream stream broke: %s", exc.__class__.__name__)
        yield stream_error_event(
            api, "The model server's stream ended unexpectedly; the answer is incomplete."
        )
    finally:
        upstream.close()
        _record_usage(gateway, model, usage)
