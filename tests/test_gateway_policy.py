"""A key's policy against a fake upstream: allowed models, caps on output length and ``n``, thinking
defaults, and errors shaped per API (OpenAI envelope on OpenAI routes, Anthropic's on ``/v1/messages``).

``fake_upstream`` is also the stand-in for vLLM of tests/test_ledger.py and tests/test_usage_api.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import anthropic
import httpx
import openai
import pytest
from aiohttp import web

from serve.gateway.keys import KeyPolicy, KeyStore

MODELS = ("m", "team-a", "team-b", "my", "other")
CHAT_USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 9,
    "total_tokens": 20,
    "prompt_tokens_details": {"cached_tokens": 3},
    "completion_tokens_details": {"reasoning_tokens": 4},
}
THINKING = "The user greets me. I should greet back."
THINKING_TOKENS = 17  # what the fake's /tokenize answers for any text
MESSAGES_USAGE = {"input_tokens": 12, "output_tokens": 30}
# Seconds a "delay" request pauses (before its answer; a stream: after its first chunk).
DELAY_S = 0.5
# Seconds a "slow" request waits for its client to leave before the fake gives up on it.
SLOW_LIMIT_S = 30.0


@dataclass
class Seen:
    """What reached the fake vLLM.

    Attributes:
        requests: ``(path, headers, raw body)`` in arrival order.
        left: ``x-request-id`` of each "slow" request whose connection the gateway closed early.
    """

    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    left_event: threading.Event = field(default_factory=threading.Event)

    def paths(self) -> list[str]:
        return [path for path, _, _ in self.requests]

    def bodies(self, path: str) -> list[bytes]:
        """Raw bodies that reached ``path``."""
        return [body for p, _, body in self.requests if p == path]

    def last(self, path: str) -> dict[str, Any]:
        """The decoded last body that reached ``path``."""
        bodies = self.bodies(path)
        assert bodies, f"nothing reached {path} upstream"
        decoded: dict[str, Any] = json.loads(bodies[-1])
        return decoded


def _sse(data: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(data).encode() + b"\n\n"


def _chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        body["usage"] = usage  # vLLM's continuous_usage_stats: usage so far on a content chunk
    return _sse(body)


CHAT_STREAM = [
    _chunk({"role": "assistant", "content": "Hel"}),
    _chunk({"content": "lo"}, finish="length"),
    _sse({"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": [], "usage": CHAT_USAGE}),
    b"data: [DONE]\n\n",
]


def fake_upstream() -> tuple[web.Application, Seen]:
    """A stand-in for vLLM's HTTP surface that records every request.

    The request body's ``mode`` (a field only this fake reads) picks a behaviour: ``slow`` answers
    nothing (a stream: one chunk with usage so far) until the client leaves, then records its
    ``x-request-id`` in ``Seen.left``; ``break`` sends two stream chunks with usage so far and drops the
    connection; ``delay`` pauses ``DELAY_S`` before the answer (a stream: after its first chunk);
    ``no_thinking`` answers ``/v1/messages`` without a thinking block.
    """
    seen = Seen()

    async def record(request: web.Request) -> bytes:
        raw = await request.read()
        seen.requests.append((request.path, dict(request.headers), raw))
        return raw

    async def wait_for_client_to_leave(request: web.Request) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SLOW_LIMIT_S
        while loop.time() < deadline:
            transport = request.transport
            if transport is None or transport.is_closing():
                seen.left.append(request.headers.get("x-request-id", ""))
                seen.left_event.set()
                return
            await asyncio.sleep(0.02)

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(request: web.Request) -> web.Response:
        await record(request)
        data = [{"id": m, "object": "model", "root": f"/srv/{m}", "parent": None} for m in MODELS]
        return web.json_response({"object": "list", "data": data})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = json.loads(await record(request))
        mode = body.get("mode")
        if not body.get("stream"):
            if mode == "slow":
                await wait_for_client_to_leave(request)
            elif mode == "delay":
                await asyncio.sleep(DELAY_S)
            message = {"role": "assistant", "content": "Hello", "reasoning_content": "hm"}
            return web.json_response(
                {
                    "id": "c1",
                    "object": "chat.completion",
                    "model": body.get("model"),
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": CHAT_USAGE,
                }
            )
        response = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        if mode == "slow":
            await response.write(
                _chunk({"content": "Hel"}, usage={"prompt_tokens": 11, "completion_tokens": 1})
            )
            await wait_for_client_to_leave(request)
            return response
        if mode == "break":
            await response.write(
                _chunk({"content": "Hel"}, usage={"prompt_tokens": 11, "completion_tokens": 1})
            )
            await response.write(
                _chunk({"content": "lo"}, usage={"prompt_tokens": 11, "completion_tokens": 2})
            )
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.abort()  # die mid-stream: the chunked body never completes
            return response
        for i, chunk in enumerate(CHAT_STREAM):
            if mode == "delay" and i == 1:
                await asyncio.sleep(DELAY_S)
            await response.write(chunk)
        await response.write_eof()
        return response

    async def completions(request: web.Request) -> web.Response:
        body = json.loads(await record(request))
        return web.json_response(
            {
                "object": "text_completion",
                "model": body.get("model"),
                "choices": [{"index": 0, "text": "Hi", "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10},
            }
        )

    async def responses(request: web.Request) -> web.Response:
        body = json.loads(await record(request))
        return web.json_response(
            {
                "id": "resp_1",
                "object": "response",
                "status": "completed",
                "model": body.get("model"),
                "output": [],
                "usage": {
                    "input_tokens": 8,
                    "output_tokens": 5,
                    "input_tokens_details": {"cached_tokens": 2},
                    "output_tokens_details": {"reasoning_tokens": 3},
                },
            }
        )

    async def messages(request: web.Request) -> web.StreamResponse:
        body = json.loads(await record(request))
        thinking = body.get("mode") != "no_thinking"
        if not body.get("stream"):
            content: list[dict[str, Any]] = [{"type": "text", "text": "Hi"}]
            if thinking:
                content.insert(0, {"type": "thinking", "thinking": THINKING, "signature": ""})
            return web.json_response(
                {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": body.get("model"),
                    "content": content,
                    "stop_reason": "end_turn",
                    "usage": MESSAGES_USAGE,
                }
            )
        response = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        start = {"type": "message", "role": "assistant", "model": body.get("model"), "content": []}
        start["usage"] = {"input_tokens": MESSAGES_USAGE["input_tokens"], "output_tokens": 1}
        events = [("message_start", {"type": "message_start", "message": start})]
        index = 0
        if thinking:
            block = {"type": "thinking", "thinking": ""}
            events.append(
                ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
            )
            half = len(THINKING) // 2
            for piece in (THINKING[:half], THINKING[half:]):
                delta = {"type": "thinking_delta", "thinking": piece}
                events.append(
                    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
                )
            events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
            index = 1
        text = {"type": "text", "text": ""}
        events += [
            ("content_block_start", {"type": "content_block_start", "index": index, "content_block": text}),
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "text_delta", "text": "Hi"},
                },
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": index}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn"},
                    "usage": {"output_tokens": MESSAGES_USAGE["output_tokens"]},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        for name, data in events:
            await response.write(_sse(data, name))
        await response.write_eof()
        return response

    async def count_tokens(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response({"input_tokens": 3})

    async def tokenize(request: web.Request) -> web.Response:
        await record(request)
        tokens = list(range(THINKING_TOKENS))
        return web.json_response({"count": THINKING_TOKENS, "max_model_len": 4096, "tokens": tokens})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_post("/tokenize", tokenize)
    return app, seen


def add_key(gateway: Any, name: str, **policy: Any) -> str:
    """Create key ``name`` with ``KeyPolicy(**policy)`` in the gateway's database and wait until the
    gateway accepts it (run the gateway with ``key_cache_ttl_s=0``: a worker then picks a new key up
    within one read of the database). The probe is ``GET /v1/usage``, which the gateway answers itself:
    nothing reaches the upstream and no ledger row is written."""
    key = KeyStore(gateway.settings.keys_db).create(name, KeyPolicy(**policy))
    deadline = time.monotonic() + 10
    while httpx.get(gateway.url + "/v1/usage", headers={"authorization": f"Bearer {key}"}).status_code == 401:
        assert time.monotonic() < deadline, f"the gateway did not accept key {name!r} within 10 s"
        time.sleep(0.02)
    return key


def post(
    gateway: Any,
    key: str | None,
    path: str,
    body: dict[str, Any] | bytes,
    request_id: str | None = None,
    **headers: str,
) -> httpx.Response:
    """POST ``body`` (a dict is sent as compact JSON) to the gateway with ``key`` as a bearer token and
    ``request_id`` as ``x-request-id``."""
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    if request_id is not None:
        headers["x-request-id"] = request_id
    raw = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    headers.setdefault("content-type", "application/json")
    return httpx.post(gateway.url + path, content=raw, headers=headers, timeout=30)


def relayed(gateway: Any, seen: Seen, key: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST ``body`` through ``gateway`` (it must answer 200) and return the body that reached the fake
    upstream on ``path``: what the gateway's rewrites made of it."""
    reply = post(gateway, key, path, body)
    assert reply.status_code == 200, reply.text
    return seen.last(path)


def chat_body(model: str = "m", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], **extra}


def messages_body(model: str = "m", **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}], **extra}


def assert_openai_error(reply: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """``reply`` is ``status`` with exactly the OpenAI envelope; returns its ``error`` object."""
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def assert_anthropic_error(reply: httpx.Response, status: int, kind: str) -> str:
    """``reply`` is ``status`` with exactly Anthropic's error shape of type ``kind``; returns the message."""
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == kind, body
    assert body["error"]["message"]
    message: str = body["error"]["message"]
    return message


@pytest.fixture
def upstream(serve_aiohttp: Callable[[web.Application], Any]) -> tuple[Any, Seen]:
    app, seen = fake_upstream()
    return serve_aiohttp(app), seen


@pytest.fixture
def gateway(upstream: tuple[Any, Seen], gateway_factory: Callable[..., tuple[Any, str]]) -> Any:
    """A gateway in front of the fake upstream that sees new keys at once (key_cache_ttl_s=0)."""
    server, _ = upstream
    started, _ = gateway_factory(server.url, key_cache_ttl_s=0)
    return started


# --- allowed models ---------------------------------------------------------------------------------


def test_a_model_outside_the_keys_list_is_403_and_never_reaches_the_upstream(gateway, upstream):
    _, seen = upstream
    key = add_key(gateway, "team", models=("m", "team-*"))
    for path, body in (
        ("/v1/chat/completions", chat_body("other")),
        ("/v1/completions", {"model": "other", "prompt": "Hi"}),
        ("/v1/responses", {"model": "other", "input": "Hi"}),
    ):
        error = assert_openai_error(post(gateway, key, path, body), 403, "model_not_allowed")
        assert error["param"] == "model" and error["type"] == "permission_error"
        assert "'other'" in error["message"] and "team" in error["message"]
    assert seen.requests == []
    # The globs and the exact id both admit what they name.
    for model in ("m", "team-a", "team-b"):
        assert post(gateway, key, "/v1/chat/completions", chat_body(model)).status_code == 200
    assert [json.loads(b)["model"] for b in seen.bodies("/v1/chat/completions")] == ["m", "team-a", "team-b"]
    # "team-*" is a glob, not a prefix of any kind: "team" alone and "my-team-a" are other models.
    for model in ("team", "my-team-a", "M"):
        assert_openai_error(post(gateway, key, "/v1/chat/completions", chat_body(model)), 403)
    assert len(seen.requests) == 3


def test_models_listing_shows_only_the_models_the_key_may_use(gateway, upstream):
    team = add_key(gateway, "team", models=("m", "team-*"))
    everyone = add_key(gateway, "everyone")

    def listed(key: str) -> list[str]:
        reply = httpx.get(gateway.url + "/v1/models", headers={"authorization": f"Bearer {key}"})
        assert reply.status_code == 200
        return [m["id"] for m in reply.json()["data"]]

    assert listed(team) == ["m", "team-a", "team-b"]
    assert listed(everyone) == list(MODELS)


# --- output caps ------------------------------------------------------------------------------------

# (route, the field the key's max_tokens caps, a minimal body without it)
CAPPED = [
    ("/v1/chat/completions", "max_tokens", chat_body()),
    ("/v1/chat/completions", "max_completion_tokens", chat_body()),
    ("/v1/completions", "max_tokens", {"model": "m", "prompt": "Hi"}),
    ("/v1/responses", "max_output_tokens", {"model": "m", "input": "Hi"}),
    ("/v1/messages", "max_tokens", {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}),
]


@pytest.mark.parametrize(("path", "field", "body"), CAPPED, ids=[f"{p}:{f}" for p, f, _ in CAPPED])
def test_output_length_above_the_cap_is_400_in_the_routes_shape(gateway, upstream, path, field, body):
    _, seen = upstream
    key = add_key(gateway, "capped", max_tokens=100)
    reply = post(gateway, key, path, {**body, field: 101})
    if path.startswith("/v1/messages"):
        message = assert_anthropic_error(reply, 400, "invalid_request_error")
        assert "101" in message and "100" in message
    else:
        error = assert_openai_error(reply, 400, "max_tokens_exceeded")
        assert error["param"] == field
        assert "101" in error["message"] and "100" in error["message"]
    assert seen.requests == []
    # At the cap, the body reaches vLLM byte for byte.
    exact = json.dumps({**body, field: 100}, separators=(",", ":")).encode()
    assert post(gateway, key, path, exact).status_code == 200
    assert seen.bodies(path) == [exact]


@pytest.mark.parametrize(("path", "field", "body"), CAPPED, ids=[f"{p}:{f}" for p, f, _ in CAPPED])
def test_with_clamp_an_output_length_above_the_cap_is_lowered_to_it(gateway, upstream, path, field, body):
    _, seen = upstream
    key = add_key(gateway, "clamped", max_tokens=100, clamp_max_tokens=True)
    assert post(gateway, key, path, {**body, field: 5000}).status_code == 200
    sent = seen.last(path)
    assert sent[field] == 100
    assert {k: v for k, v in sent.items() if k != field} == body


@pytest.mark.parametrize(
    ("path", "field", "body"),
    [
        ("/v1/chat/completions", "max_tokens", chat_body()),
        ("/v1/completions", "max_tokens", {"model": "m", "prompt": "Hi"}),
        ("/v1/responses", "max_output_tokens", {"model": "m", "input": "Hi"}),
        ("/v1/messages", "max_tokens", {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}),
    ],
)
def test_a_request_without_an_output_length_is_given_the_cap(gateway, upstream, path, field, body):
    _, seen = upstream
    key = add_key(gateway, "capped", max_tokens=100)
    assert post(gateway, key, path, body).status_code == 200
    assert seen.last(path) == {**body, field: 100}


def test_without_a_cap_output_lengths_pass_unchanged(gateway, upstream):
    _, seen = upstream
    key = add_key(gateway, "free")
    unset = json.dumps(chat_body(), separators=(",", ":")).encode()
    huge = json.dumps(chat_body(max_tokens=1_000_000), separators=(",", ":")).encode()
    assert post(gateway, key, "/v1/chat/completions", unset).status_code == 200
    assert post(gateway, key, "/v1/chat/completions", huge).status_code == 200
    assert seen.bodies("/v1/chat/completions") == [unset, huge]


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/chat/completions", chat_body()), ("/v1/completions", {"model": "m", "prompt": "Hi"})],
)
def test_n_above_the_keys_max_n_is_400_and_never_reaches_the_upstream(gateway, upstream, path, body):
    _, seen = upstream
    key = add_key(gateway, "few", max_n=4)
    error = assert_openai_error(post(gateway, key, path, {**body, "n": 1000}), 400, "n_exceeded")
    assert error["param"] == "n" and "1000" in error["message"] and "4" in error["message"]
    assert seen.requests == []
    assert post(gateway, key, path, {**body, "n": 4}).status_code == 200
    assert seen.last(path)["n"] == 4


# --- thinking default -------------------------------------------------------------------------------


def test_the_keys_enable_thinking_fills_only_what_the_request_leaves_unset(gateway, upstream):
    _, seen = upstream
    key = add_key(gateway, "quick", enable_thinking=False)
    path = "/v1/chat/completions"

    def sent(body: dict[str, Any]) -> tuple[bytes, bytes]:
        raw = json.dumps(body, separators=(",", ":")).encode()
        assert post(gateway, key, path, raw).status_code == 200
        return raw, seen.bodies(path)[-1]

    _, unset = sent(chat_body())
    assert json.loads(unset)["chat_template_kwargs"] == {"enable_thinking": False}
    _, other = sent(chat_body(chat_template_kwargs={"x": 1}))
    assert json.loads(other)["chat_template_kwargs"] == {"enable_thinking": False, "x": 1}
    raw, explicit = sent(chat_body(chat_template_kwargs={"enable_thinking": True}))
    assert explicit == raw
    # Completions take no chat template: their bodies are left alone.
    raw_completion = json.dumps({"model": "m", "prompt": "Hi"}, separators=(",", ":")).encode()
    assert post(gateway, key, "/v1/completions", raw_completion).status_code == 200
    assert seen.bodies("/v1/completions") == [raw_completion]
    # A key with no thinking default leaves chat bodies as they are.
    plain = add_key(gateway, "plain")
    raw_plain = json.dumps(chat_body(), separators=(",", ":")).encode()
    assert post(gateway, plain, path, raw_plain).status_code == 200
    assert seen.bodies(path)[-1] == raw_plain


# --- errors per API ---------------------------------------------------------------------------------

ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")


@pytest.mark.parametrize("path", ANTHROPIC_PATHS)
def test_gateway_errors_on_anthropic_routes_use_anthropics_shape(upstream, gateway_factory, path):
    server, seen = upstream
    gateway, _ = gateway_factory(server.url, key_cache_ttl_s=0, max_body_bytes=1024)
    key = add_key(gateway, "team", models=("m",))
    assert_anthropic_error(post(gateway, None, path, messages_body()), 401, "authentication_error")
    assert_anthropic_error(
        post(gateway, "sk-kit-00000000_nope", path, messages_body()), 401, "authentication_error"
    )
    message = assert_anthropic_error(
        post(gateway, key, path, messages_body("other")), 403, "permission_error"
    )
    assert "'other'" in message
    big = messages_body(messages=[{"role": "user", "content": "x" * 2048}])
    assert_anthropic_error(post(gateway, key, path, big), 413, "request_too_large")
    wrong_method = httpx.get(gateway.url + path, headers={"x-api-key": key})
    assert_anthropic_error(wrong_method, 405, "invalid_request_error")
    assert seen.requests == []
    assert post(gateway, key, path, messages_body()).status_code == 200


@pytest.mark.parametrize("path", ANTHROPIC_PATHS)
def test_upstream_down_on_anthropic_routes_is_503_in_anthropics_shape(
    gateway_factory, path, down_upstream_url
):
    gateway, key = gateway_factory(down_upstream_url, retry_after_s=7)
    reply = post(gateway, key, path, messages_body())
    assert_anthropic_error(reply, 503, "overloaded_error")
    assert reply.headers["retry-after"] == "7"


def test_openai_routes_keep_the_openai_envelope_for_the_same_errors(
    upstream, gateway_factory, down_upstream_url
):
    server, seen = upstream
    gateway, _ = gateway_factory(server.url, key_cache_ttl_s=0, max_body_bytes=1024)
    key = add_key(gateway, "team", models=("m",))
    path = "/v1/chat/completions"
    assert_openai_error(post(gateway, None, path, chat_body()), 401, "invalid_api_key")
    assert_openai_error(post(gateway, key, path, chat_body("other")), 403, "model_not_allowed")
    big = chat_body(messages=[{"role": "user", "content": "x" * 2048}])
    assert_openai_error(post(gateway, key, path, big), 413, "request_too_large")
    wrong_method = httpx.get(gateway.url + path, headers={"authorization": f"Bearer {key}"})
    assert_openai_error(wrong_method, 405, "method_not_allowed")
    assert seen.requests == []
    down, down_key = gateway_factory(down_upstream_url)
    assert_openai_error(post(down, down_key, path, chat_body()), 503, "upstream_unavailable")


def test_the_anthropic_sdk_raises_its_own_exceptions_for_gateway_errors(gateway, upstream):
    _, seen = upstream
    team = add_key(gateway, "team", models=("m",))
    # A budget that admits one small request and not a second (its usage is settled to 42 tokens).
    budget = add_key(gateway, "budget", budget_day=50)

    def client(key: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0)

    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(anthropic.AuthenticationError) as unauthorised:
        client("sk-kit-00000000_nope").messages.create(model="m", max_tokens=10, messages=messages)
    assert unauthorised.value.status_code == 401
    assert unauthorised.value.type == "authentication_error"  # the SDK reads error.type from the body
    with pytest.raises(anthropic.PermissionDeniedError):
        client(team).messages.create(model="other", max_tokens=10, messages=messages)
    assert seen.requests == []
    first = client(budget).messages.create(model="m", max_tokens=10, messages=messages)
    assert first.usage.output_tokens == MESSAGES_USAGE["output_tokens"]
    with pytest.raises(anthropic.RateLimitError) as limited:
        client(budget).messages.create(model="m", max_tokens=10, messages=messages)
    assert int(limited.value.response.headers["retry-after"]) >= 1
    assert "budget_day" in limited.value.message
    # The OpenAI SDK, on the OpenAI routes, gets the OpenAI envelope for the same refusals.
    with pytest.raises(openai.AuthenticationError) as openai_unauthorised:
        openai.OpenAI(
            base_url=gateway.url + "/v1", api_key="sk-kit-00000000_nope", max_retries=0
        ).models.list()
    assert openai_unauthorised.value.code == "invalid_api_key"


# --- rotation through the gateway --------------------------------------------------------------------


def test_a_rotated_key_answers_with_both_secrets_until_the_grace_ends(upstream, gateway_factory):
    # A long key cache TTL: the end of the grace is enforced from the worker's copy, not by a reload.
    server, _ = upstream
    gateway, old = gateway_factory(server.url, key_cache_ttl_s=3600)
    new = KeyStore(gateway.settings.keys_db).rotate("tester", timedelta(seconds=3))
    grace_ends = time.monotonic() + 3

    def status(key: str) -> int:
        return httpx.get(gateway.url + "/v1/models", headers={"authorization": f"Bearer {key}"}).status_code

    assert status(old) == 200 and status(new) == 200
    assert time.monotonic() < grace_ends, "too slow to check both secrets inside the grace"
    deadline = time.monotonic() + 10
    while status(old) != 401:
        assert time.monotonic() < deadline, "the old secret still worked 10 s after a 3 s grace"
        time.sleep(0.1)
    assert status(new) == 200


# --- what vLLM accepts must not slip past the policy -------------------------------------------------


@pytest.mark.parametrize("model", ["absent", None])
def test_a_request_without_a_model_cannot_reach_a_model_outside_the_key(gateway, upstream, model):
    _, seen = upstream
    key = add_key(gateway, "adapter-only", models=("team-a",))
    body = chat_body()
    if model == "absent":
        del body["model"]
    else:
        body["model"] = model
    reply = post(gateway, key, "/v1/chat/completions", body)
    assert reply.status_code in (400, 403), reply.text
    assert seen.requests == []


@pytest.mark.parametrize(
    ("field", "value"), [("max_tokens", "5000"), ("max_tokens", 5000.0), ("n", "1000"), ("n", 1000.0)]
)
def test_numbers_vllm_would_coerce_cannot_slip_past_the_caps(gateway, upstream, field, value):
    _, seen = upstream
    key = add_key(gateway, "capped", max_tokens=100, max_n=4)
    reply = post(gateway, key, "/v1/chat/completions", chat_body(**{field: value}))
    assert reply.status_code == 400, reply.text
    assert seen.requests == []
