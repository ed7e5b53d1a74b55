"""The pass-through pipeline for one request: authenticate -> admit -> rewrite -> relay -> account.

Plain ASGI, no framework objects on the path of every token: headers are read from the ASGI scope, the
body is parsed at most once (only to learn ``model``, ``stream`` and the fields a policy caps), and
upstream bytes are forwarded as they arrive, never re-encoded (the one exception: the usage-only chunk
the gateway asked vLLM for is dropped when the client did not ask for it).

Once a request has run for ``WATCH_AFTER_S``, a watcher task waits for the client to leave; when it does
before the answer is complete, the request's task is cancelled, which closes the upstream connection, and
vLLM aborts the generation (streamed or not). Requests answered sooner never start one: a task per
request would cost more than everything else the gateway adds (see the README's "Gateway speed"). The
same per-worker sweep (``watchdog.py``) cancels a request whose upstream is silent for
``upstream_read_timeout_s``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from sqlalchemy.engine import Engine
from starlette.types import Receive, Scope, Send
from yarl import URL

from serve.gateway import policy, system_policy, thinking
from serve.gateway.aliases import Aliases
from serve.gateway.errors import (
    GatewayError,
    send_error,
    stream_error_event,
    timed_out,
    too_large,
    unauthorized,
    unavailable,
)
from serve.gateway.keys import KeyCache, Principal, match
from serve.gateway.ledger import COLUMNS, LedgerWriter
from serve.gateway.limits import Denial, Limiter, LocalLimiter, Reservation
from serve.gateway.metrics import GatewayMetrics
from serve.gateway.routes import ROUTES, Route
from serve.gateway.settings import GatewaySettings
from serve.gateway.usage import UsageChunkFilter, UsageCounter
from serve.gateway.watchdog import Watchdog

logger = logging.getLogger(__name__)
_DECODER = json.JSONDecoder()

_AUTHORIZATION, _API_KEY, _CONTENT_LENGTH, _REQUEST_ID = range(4)
_REQUEST_HEADERS: dict[bytes, int | str] = {
    b"authorization": _AUTHORIZATION,
    b"x-api-key": _API_KEY,
    b"content-length": _CONTENT_LENGTH,
    b"x-request-id": _REQUEST_ID,
    # Forwarded upstream, under these names:
    b"content-type": "content-type",
    b"accept": "accept",
    b"anthropic-version": "anthropic-version",
    b"anthropic-beta": "anthropic-beta",
}
"""The request headers the pass-through routes read (an int) or forward to vLLM (the name to send)."""
# Hop-by-hop headers (RFC 9110 section 7.6.1) and those the gateway's server sets itself.
_DROP_RESPONSE_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"date",
        b"server",
        b"x-request-id",
    }
)
_SSE = "text/event-stream"
WATCH_AFTER_S = 0.05
"""How long a request runs before a task starts watching for its client to leave (a generation on the
model takes longer than this; a client that left sooner is noticed now)."""


@dataclass
class Gateway:
    """What the pass-through routes of one worker share, built in ``create_app``, opened in its lifespan."""

    settings: GatewaySettings
    keys: KeyCache
    limiter: Limiter | LocalLimiter
    ledger: LedgerWriter
    metrics: GatewayMetrics
    engine: Engine
    session: aiohttp.ClientSession | None = None
    upstream_headers: dict[str, str] = field(default_factory=dict)
    upstream_base: str = field(init=False)
    urls: dict[str, URL] = field(init=False)
    aliases: Aliases = field(init=False)
    watchdog: Watchdog = field(init=False)
    relay_timeout: aiohttp.ClientTimeout = field(init=False)

    def __post_init__(self) -> None:
        self.aliases = Aliases(self.settings.model_aliases)
        self.watchdog = Watchdog(self.settings.upstream_read_timeout_s, WATCH_AFTER_S)
        # The relay's upstream requests: the watchdog keeps their read timeout (no aiohttp timer).
        self.relay_timeout = aiohttp.ClientTimeout(
            total=None, connect=self.settings.upstream_connect_timeout_s
        )
        # Parsed once: aiohttp would parse a URL string on every request.
        self.upstream_base = self.settings.upstream_base
        self.urls = {route.path: URL(self.upstream_base + route.path) for route in ROUTES}


class ClientGone(Exception):
    """The client disconnected before the answer was complete."""


@dataclass(slots=True)
class Call:
    """One request's state, from the first byte in to its ledger row."""

    request_id: str
    route: Route
    start: float
    created_at: float  # epoch seconds (the ledger writer turns it into its column's type)
    principal: Principal | None = None
    model: str | None = None
    stream: bool = False
    status: int = 500
    outcome: str = "upstream_error"
    ttft_ms: float | None = None
    usage: UsageCounter = field(default_factory=UsageCounter)
    reservation: Reservation | None = None
    settled: bool = False
    finished: bool = False  # the last byte is being sent: a disconnect now is not a client leaving
    client_gone: bool = False
    client_ip: str | None = None
    response_started: bool = False
    streaming: bool = False  # an SSE answer is being relayed
    sent_bytes: int = 0
    policy_id: str | None = None  # the system policy the request carried (system_policy.py)
    presented: str | None = None  # the key from Authorization: Bearer or x-api-key (never logged)
    declared_length: bytes | None = None  # the Content-Length header
    forward_headers: dict[str, str] = field(default_factory=dict)  # request headers vLLM gets too
    upstream_at: float = 0.0  # perf_counter() of the upstream's last sign of life (watchdog.py)
    watcher: asyncio.Task[None] | None = None  # waits for the client to leave (watchdog.py)
    timed_out: bool = False  # the upstream was silent for upstream_read_timeout_s: cancelled
    done: bool = False  # the request is over (the watchdog lets go of it)

    @property
    def id_header(self) -> tuple[bytes, bytes]:
        """The ``x-request-id`` response header."""
        return (b"x-request-id", self.request_id.encode())


def read_head(call: Call, headers: list[tuple[bytes, bytes]]) -> str | None:
    """Read a pass-through request's headers in one pass: the presented key (``Authorization: Bearer``
    first, else ``x-api-key``), ``Content-Length`` and the headers forwarded upstream go to ``call``.

    Returns:
        The client's ``x-request-id`` (unchecked: see ``access.request_id_of``), or None.
    """
    kinds = _REQUEST_HEADERS
    forward = call.forward_headers
    bearer = api_key = client_id = None
    for name, value in headers:
        kind = kinds.get(name)
        if kind is None:
            continue
        if kind == _AUTHORIZATION:
            if bearer is None:
                text = value.decode("latin-1")
                if text[:7].lower() == "bearer ":
                    bearer = text[7:].strip()
        elif kind == _API_KEY:
            api_key = value.decode("latin-1")
        elif kind == _CONTENT_LENGTH:
            if call.declared_length is None:
                call.declared_length = value
        elif kind == _REQUEST_ID:
            if client_id is None:
                client_id = value.decode("latin-1")
        else:
            forward[kind] = value.decode("latin-1")  # type: ignore[index]
    call.presented = bearer if bearer is not None else api_key
    return client_id


def presented_key(scope: Scope) -> str | None:
    """The key from ``Authorization: Bearer`` or ``x-api-key`` (the gateway's own routes; pass-through
    requests get it from ``read_head``)."""
    api_key = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            text = value.decode("latin-1")
            if text[:7].lower() == "bearer ":
                return text[7:].strip()
        elif name == b"x-api-key":
            api_key = value.decode("latin-1")
    return api_key


async def authenticate(gateway: Gateway, presented: str | None) -> Principal:
    """The principal of the ``presented`` key (``presented_key`` or ``read_head`` found it).

    Raises:
        GatewayError: 401 for a missing, malformed, unknown, expired or revoked key.
    """
    keys = gateway.keys
    if not presented:
        principal = None
    elif keys.fresh():
        principal = match(keys.active, presented)  # the usual case: no await, no task switch
    else:
        principal = await keys.authenticate(presented)
    if principal is None:
        raise unauthorized()
    return principal


def declared_length(scope: Scope) -> bytes | None:
    """The request's ``Content-Length`` header, as sent (the gateway's own routes; pass-through requests
    get it from ``read_head``)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value
    return None


async def read_body(receive: Receive, limit: int, declared: bytes | None) -> bytes:
    """The whole request body; ``declared`` is its ``Content-Length`` header, if any.

    Raises:
        GatewayError: 413 once it passes ``limit`` bytes (declared or counted).
        ClientGone: the client left before sending all of it.
    """
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            raise too_large(limit)
        if not parts and not message.get("more_body", False):
            return part  # the usual case: uvicorn hands over a small body in one message, no copy
        parts.append(part)
        if not message.get("more_body", False):
            return b"".join(parts)


def _request_object(body: bytes) -> dict[str, Any] | None:
    """The JSON object of a body; None for anything else, which goes upstream unchanged and vLLM answers
    with its own 400."""
    if not body:
        return None
    try:
        # The usual body: UTF-8 text that starts with its object. json.loads(bytes) would first guess the
        # encoding and skip leading whitespace in Python code (1.6 us more, timed 2026-12-05).
        text = body.decode()
        obj, end = _DECODER.raw_decode(text)
        if end != len(text) and not text[end:].isspace():
            raise ValueError("data after the object")
    except ValueError:  # anything else is decided as vLLM's server decides it (Starlette: json.loads)
        try:
            obj = json.loads(body)
        except ValueError:
            return None
    return obj if isinstance(obj, dict) else None


def with_fields(body: bytes, obj: dict[str, Any], changes: dict[str, Any]) -> bytes:
    """``body`` (whose JSON object is ``obj``) with ``changes`` set at its top level.

    Fields the body lacks are spliced in after its opening brace, so the rest (a long prompt, say) is
    forwarded as the client sent it instead of being decoded and encoded again; a field the body already
    has is replaced by encoding the whole object anew (JSON readers keep a duplicate key's last value).
    """
    start = body.find(b"{")
    if not obj or start < 0 or any(name in obj for name in changes):
        return json.dumps({**obj, **changes}).encode()
    fields = json.dumps(changes)[1:-1].encode()
    return body[: start + 1] + fields + b"," + body[start + 1 :]


def _system_policy_fields(
    gateway: Gateway, route: Route, obj: dict[str, Any], policy_id: str
) -> dict[str, Any]:
    """The fields carrying system policy ``policy_id`` on ``route`` (count_tokens counts it too).

    Raises:
        GatewayError: 500 when the settings no longer define the policy (fail closed: never serve a key
            without the policy it was given), 400 on a route that cannot carry it.
    """
    found = gateway.settings.system_policies.get(policy_id)
    if found is None:
        raise GatewayError(
            500,
            f"This key's system policy {policy_id!r} is not defined in the gateway settings. An admin must "
            f"define it under system_policies or clear it (make key-set NAME=... SYSTEM_POLICY=none).",
            "api_error",
            "system_policy_missing",
        )
    path = "/v1/messages" if route.path == "/v1/messages/count_tokens" else route.path
    return system_policy.system_fields(path, obj, policy_id, found)


def rewrite(gateway: Gateway, call: Call, obj: dict[str, Any] | None) -> tuple[dict[str, Any], bool]:
    """The top-level fields to change in the request body, and whether the client wants stream usage.

    In order: an alias becomes the served model it stands for; the key's model list, caps, system policy
    (the key's, else the model's) and thinking policy apply; the model's non-thinking sampling preset
    fills in for a request that does not think and chose no sampling.

    Raises:
        GatewayError: 403 (model not allowed), 400 (a cap exceeded, or a route a system policy cannot be
            added to) or 500 (the key's system policy is not defined).
    """
    assert call.principal is not None
    route = call.route
    if obj is None:
        return {}, True
    changes: dict[str, Any] = {}
    if gateway.aliases and call.model is not None:
        target = gateway.aliases.resolve(call.model)
        if target is not None:
            call.model = changes["model"] = target
    policy.check_model(call.principal, call.model)
    changes.update(policy.capped_fields(obj, route, call.principal))
    policy_id = call.principal.policy.system_policy
    if policy_id is None and gateway.settings.model_system_policies:
        policy_id = gateway.settings.model_system_policies.get(call.model or "")
    if policy_id is not None:
        changes.update(_system_policy_fields(gateway, route, obj, policy_id))
        call.policy_id = policy_id
    if route.thinking is not None and thinking.may_change(
        obj, route.thinking, call.principal.policy, call.model or "", gateway.settings
    ):
        settings = gateway.settings
        model = call.model or ""
        if route.thinking == "chat":
            defaults = dict(settings.default_chat_template_kwargs.get(model, {}))
            decided = defaults.get("enable_thinking")
            thinking_on, extra = thinking.chat_thinking(obj, call.principal, decided)
            if thinking_on is not None:
                defaults["enable_thinking"] = thinking_on
            if defaults:
                merged = policy.template_kwargs(obj, defaults)
                if merged is not None:
                    changes["chat_template_kwargs"] = merged
        else:
            thinking_on, extra = thinking.messages_thinking(obj, call.principal)
        changes.update(extra)
        if thinking_on is False:
            preset = settings.non_thinking_sampling.get(model)
            if preset and route.api == "anthropic":
                preset = {k: v for k, v in preset.items() if k in thinking.ANTHROPIC_SAMPLING_FIELDS}
            changes.update(thinking.non_thinking_preset(obj, preset))
    wants_usage = True
    if call.stream and route.stream_usage:
        options, wants_usage = policy.stream_usage_options(obj)
        if options is not None:
            changes["stream_options"] = options
    return changes, wants_usage


async def admit(gateway: Gateway, call: Call, obj: dict[str, Any] | None, body_bytes: int) -> None:
    """Count the request against its key's limits.

    Raises:
        GatewayError: 429 with ``Retry-After`` naming the limit and its reset (400 when the request alone
            is larger than a token limit).
    """
    principal = call.principal
    assert principal is not None
    if not call.route.generates or not principal.policy.limited:
        return
    tokens = policy.output_reservation(obj, call.route, body_bytes, gateway.settings.unreserved_output_tokens)
    limiter = gateway.limiter
    if limiter.on_loop:
        result = limiter.admit(principal.name, principal.policy, call.request_id, tokens)
        if isinstance(result, Denial) and result.recalled:  # other workers' leases asked back: wait
            result = await limiter.after_recall(
                result, principal.name, principal.policy, call.request_id, tokens
            )
    else:
        result = await limiter.admit_async(principal.name, principal.policy, call.request_id, tokens)
    if isinstance(result, Denial):
        now = time.time()
        gateway.metrics.rate_limited.labels(principal.name, result.limit).inc()
        if result.never_fits:
            raise GatewayError(
                400, result.message(principal.name, now), "invalid_request_error", "max_tokens_exceeded"
            )
        budget = result.limit.startswith("budget")
        raise GatewayError(
            429,
            result.message(principal.name, now),
            "insufficient_quota" if budget else ("tokens" if result.limit == "tpm" else "requests"),
            "insufficient_quota" if budget else "rate_limit_exceeded",
            headers={
                "retry-after": str(max(1, int(result.resets_at - now + 0.999))),
                "x-ratelimit-limit": f"{result.limit}={result.value}",
                "x-ratelimit-reset": datetime.fromtimestamp(result.resets_at, UTC).strftime(
                    "%Y-%m-%dT%H:%M:%SZ"
                ),
            },
        )
    call.reservation = result


async def settle(gateway: Gateway, call: Call) -> None:
    """Replace the call's reservation by its real usage and free its in-flight slot (once)."""
    if call.settled or call.reservation is None:
        return
    call.settled = True
    try:
        if gateway.limiter.on_loop:
            gateway.limiter.settle(call.reservation, call.usage.total)
        else:
            await gateway.limiter.settle_async(call.reservation, call.usage.total)
    except Exception:
        logger.exception("settling the limits of request %s failed", call.request_id)


def _response_headers(
    upstream: aiohttp.ClientResponse, *extra: tuple[bytes, bytes]
) -> list[tuple[bytes, bytes]]:
    """The upstream's headers a client needs (hop-by-hop and server-set ones dropped), then ``extra``."""
    headers = [
        (lowered, value)
        for name, value in upstream.raw_headers
        if (lowered := name.lower()) not in _DROP_RESPONSE_HEADERS
    ]
    headers.extend(extra)
    return headers


def filtered_listing(payload: bytes, principal: Principal, aliases: Aliases | None = None) -> bytes:
    """A ``/v1/models`` body with only the models the key may use, each model's ``root`` (vLLM puts
    the model's or adapter's folder on the server there) replaced by its id, and the exact aliases of
    those models. Anything that is not the expected JSON passes unchanged."""
    try:
        listing = json.loads(payload)
    except ValueError:
        return payload
    models = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(models, list):
        return payload
    kept = []
    for entry in models:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            if not principal.policy.allows(entry["id"]):
                continue
            if "root" in entry:
                entry["root"] = entry["id"]
        kept.append(entry)
    if aliases:
        kept += aliases.listing_entries(kept)
    listing["data"] = kept
    return json.dumps(listing).encode()


async def relay(
    gateway: Gateway, call: Call, scope: Scope, send: Send, body: bytes, wants_usage: bool
) -> None:
    """Send the request upstream and the answer back, streamed as it arrives.

    Raises:
        GatewayError: 503 (upstream unreachable) or 504 (upstream silent for the read timeout) before
            any byte of the answer was sent.
    """
    settings = gateway.settings
    route = call.route
    headers = call.forward_headers
    if gateway.upstream_headers:
        headers.update(gateway.upstream_headers)
    headers["x-request-id"] = call.request_id  # vLLM's logs and request ids join ours
    headers["accept-encoding"] = "identity"  # bytes are relayed as they are: never ask for compression
    url: URL | str = gateway.urls[route.path]
    if scope.get("query_string"):
        url = gateway.upstream_base + route.path + "?" + scope["query_string"].decode("latin-1")
    assert gateway.session is not None, "the upstream session opens in the app's lifespan"
    try:
        upstream = await gateway.session.request(
            route.method, url, data=body or None, headers=headers, timeout=gateway.relay_timeout
        )
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:  # a connect timeout included
        gateway.metrics.upstream_errors.labels("connect").inc()
        logger.warning("upstream unreachable: %s", exc.__class__.__name__)
        raise unavailable("connection refused or reset", settings.retry_after_s) from None
    try:
        call.status = upstream.status
        content_type = upstream.headers.get("content-type", "application/json")
        if upstream.status >= 400 or not content_type.startswith(_SSE):
            await _relay_whole(gateway, call, upstream, send)
        else:
            await _relay_stream(gateway, call, upstream, send, wants_usage)
    finally:
        upstream.close()


async def _relay_whole(gateway: Gateway, call: Call, upstream: aiohttp.ClientResponse, send: Send) -> None:
    try:
        payload = await upstream.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        gateway.metrics.upstream_errors.labels("read").inc()
        logger.warning("upstream answer broke off: %s", exc.__class__.__name__)
        raise unavailable("the response broke off", gateway.settings.retry_after_s) from None
    if upstream.status >= 500:
        gateway.metrics.upstream_errors.labels("status").inc()
    answer = payload
    if upstream.status < 400 and call.route.lists_models and call.principal is not None:
        answer = filtered_listing(payload, call.principal, gateway.aliases)
    call.outcome = "ok"
    headers = _response_headers(upstream, (b"content-length", str(len(answer)).encode()), call.id_header)
    call.finished = True
    call.response_started = True
    call.sent_bytes = len(answer)
    counted = call.reservation is not None
    if counted:
        # The client's next request, on any worker, must find this one's tokens counted and its
        # in-flight slot free: settled before the answer leaves, not after (another worker may run the
        # client's next request before this one gets the CPU back).
        if upstream.status < 400:
            call.usage.feed_body(payload)
        await settle(gateway, call)
    try:
        await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer, "more_body": False})
    finally:
        if not counted and upstream.status < 400:
            call.usage.feed_body(payload)  # the ledger's figures: after the send, off the latency


async def _relay_stream(
    gateway: Gateway, call: Call, upstream: aiohttp.ClientResponse, send: Send, wants_usage: bool
) -> None:
    usage = call.usage
    strip = None if wants_usage else UsageChunkFilter()
    call.response_started = call.streaming = True
    await send(
        {
            "type": "http.response.start",
            "status": upstream.status,
            "headers": _response_headers(upstream, call.id_header),
        }
    )
    tail = b""
    end = call.route.stream_end  # one search per chunk: this loop runs for every token
    try:
        async for chunk in upstream.content.iter_any():
            call.upstream_at = now = time.perf_counter()  # not silent (watchdog.py)
            if call.ttft_ms is None:
                call.ttft_ms = (now - call.start) * 1000
            usage.feed_sse(chunk)
            out = strip.feed(chunk) if strip is not None else chunk
            if out:
                call.sent_bytes += len(out)
                if not call.finished and end in out:
                    call.finished = True  # the client has the whole answer: leaving now is not leaving early
                # The client may send its next request as soon as it reads the end event, before the
                # upstream's response ends: the limits settle before the piece leaves. The usage is
                # complete once the end event is (it comes in or before that event).
                if (
                    call.finished
                    and not call.settled
                    and call.reservation is not None
                    and usage.between_events
                ):
                    await settle(gateway, call)
                await send({"type": "http.response.body", "body": out, "more_body": True})
        call.outcome = "ok"
        if strip is not None:
            tail = strip.flush()
    except (aiohttp.ClientError, TimeoutError) as exc:
        gateway.metrics.upstream_errors.labels("stream").inc()
        logger.warning("upstream stream broke: %s", exc.__class__.__name__)
        call.outcome = "upstream_error"
        tail = stream_error_event(
            call.route.api, "The model server's stream ended unexpectedly; the answer is incomplete."
        )
    await settle(gateway, call)
    call.finished = True
    call.sent_bytes += len(tail)
    await send({"type": "http.response.body", "body": tail, "more_body": False})


async def _end_early(call: Call, send: Send, error: GatewayError, stream_message: str, reason: str) -> None:
    """Tell the client its request ended before its answer (``reason``: ``shutdown``, ``timeout``): an
    error event saying ``stream_message`` ends a stream (never a silent cut, which reads as a complete
    answer), ``error`` answers a request not yet answered. A response already sent whole needs nothing."""
    try:
        if call.streaming and not call.finished:
            call.finished = True
            event = stream_error_event(call.route.api, stream_message)
            call.sent_bytes += len(event)
            await send({"type": "http.response.body", "body": event, "more_body": False})
        elif not call.response_started:
            call.response_started = call.finished = True
            call.status = error.status
            await send_error(send, call.route.api, error, call.id_header)
    except Exception as exc:  # the connection may be gone already: the ledger row still says why
        logger.warning("could not tell the client of %s about the %s: %r", call.request_id, reason, exc)


async def count_reasoning(gateway: Gateway, call: Call) -> None:
    """Reasoning tokens of an answer whose API reports none (Anthropic thinking blocks): the thinking
    text counted with the served tokenizer (vLLM's ``/tokenize``)."""
    usage = call.usage
    if usage.reasoning_reported or not usage.reasoning_text or gateway.session is None:
        return
    try:
        async with gateway.session.post(
            gateway.upstream_base + "/tokenize",
            json={"model": call.model, "prompt": "".join(usage.reasoning_text), "add_special_tokens": False},
            headers=gateway.upstream_headers,
        ) as reply:
            counted = (await reply.json()).get("count") if reply.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        logger.warning("could not count reasoning tokens of %s: %r", call.request_id, exc)
        return
    if isinstance(counted, int):
        usage.reasoning = counted


def ledger_values(call: Call) -> tuple[Any, ...]:
    """The call's ``usage_ledger`` row, as values in ``ledger.COLUMNS`` order."""
    usage = call.usage
    return (
        call.request_id,
        call.created_at,
        call.principal.name if call.principal else None,
        call.model,
        call.route.path,
        call.status,
        call.outcome,
        call.stream,
        usage.prompt,
        usage.completion,
        usage.reasoning,
        usage.cached,
        (time.perf_counter() - call.start) * 1000,
        call.ttft_ms,
        usage.finish_reason,
        call.policy_id,
        call.client_ip,
    )


def ledger_row(call: Call) -> dict[str, Any]:
    """The call's ``usage_ledger`` row as a mapping (for reading; the request path uses ``ledger_values``)."""
    return dict(zip(COLUMNS, ledger_values(call), strict=True))


def account(gateway: Gateway, call: Call) -> None:
    """Ledger row and per-key token counters for a finished call (no I/O: the ledger batches)."""
    usage = call.usage
    if call.principal is not None and (usage.prompt or usage.completion):
        gateway.metrics.add_usage(
            call.principal.name, call.model or "unknown", usage.prompt, usage.completion, usage.reasoning
        )
    gateway.ledger.record_values(ledger_values(call))


async def forward(
    gateway: Gateway, route: Route, scope: Scope, receive: Receive, send: Send, call: Call
) -> None:
    """Serve one pass-through request: authenticate -> admit -> rewrite -> relay -> account.

    Errors the gateway raises are answered in the route's API shape; the ledger gets one row whatever
    happens.
    """
    task = asyncio.current_task()
    assert task is not None
    try:
        try:
            call.principal = await authenticate(gateway, call.presented)
            body = await read_body(receive, gateway.settings.max_body_bytes, call.declared_length)
            gateway.watchdog.add(call, receive, task)
            obj = _request_object(body)
            if obj is not None:
                model = obj.get("model")
                call.model = model if isinstance(model, str) else None
                call.stream = obj.get("stream") is True
            call.usage.collect_thinking = route.thinking_text
            changes, wants_usage = rewrite(gateway, call, obj)
            if changes:
                assert obj is not None
                body = with_fields(body, obj, changes)
            if route.generates and call.principal.policy.limited:
                await admit(gateway, call, obj, len(body))
            await relay(gateway, call, scope, send, body, wants_usage)
        except GatewayError as error:
            call.status = error.status
            call.outcome = "upstream_error" if error.status in (503, 504) else "rejected"
            call.finished = True
            call.response_started = True
            await send_error(send, route.api, error, call.id_header)
        except ClientGone:
            call.client_gone = True
    except asyncio.CancelledError:
        if call.client_gone:
            task.uncancel()
        elif call.timed_out:  # the watchdog found the upstream silent for the read timeout
            task.uncancel()
            gateway.metrics.upstream_errors.labels("timeout").inc()
            call.outcome = "upstream_error"
            error = timed_out(gateway.settings.upstream_read_timeout_s)
            await _end_early(call, send, error, error.message, "timeout")
        else:
            # The server is stopping and its grace period for in-flight requests is over.
            call.outcome = "shutdown"
            await _end_early(
                call,
                send,
                unavailable("the gateway is shutting down", gateway.settings.retry_after_s, "shutting_down"),
                "The gateway is shutting down; the answer is incomplete. Retry the request.",
                "shutdown",
            )
            raise
    except Exception:
        call.outcome = "error"  # the gateway's own failure: access.py answers 500 and logs it
        raise
    finally:
        gateway.watchdog.release(call)
        if call.client_gone:
            call.outcome = "client_disconnect"
            call.status = 499  # nginx's "client closed request": what the ledger shows for it
            gateway.metrics.client_disconnects.inc()
        if call.reservation is not None and not call.settled:
            await settle(gateway, call)
        if route.thinking_text:
            await count_reasoning(gateway, call)
        account(gateway, call)
