"""The gateway against a fake upstream: auth, allowlist, limits, error mapping, streaming, metrics."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import time
import urllib.parse
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from serve.gateway.errors import GatewayError
from serve.gateway.keys import KeyPolicy
from serve.gateway.limits import Limiter
from serve.gateway.proxy import _request_object, read_body, read_head
from serve.gateway.settings import GatewaySettings

_HEAD = b'data: {"id":"c1","object":"chat.completion.chunk","model":"m","choices":'
CHUNKS = [
    _HEAD + b'[{"index":0,"delta":{"content":"Hel"}}]}\n\n',
    _HEAD + b'[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}\n\n',
    _HEAD + b'[],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}\n\n',
    b"data: [DONE]\n\n",
]
VLLM_404 = (
    b'{"error":{"message":"The model `missing` does not exist.",'
    b'"type":"NotFoundError","param":"model","code":404}}'
)


def fake_vllm() -> tuple[web.Application, dict[str, Any]]:
    """A stand-in for vLLM's HTTP surface, recording what reached it."""
    seen: dict[str, Any] = {"paths": [], "disconnected": asyncio.Event(), "headers": []}

    async def record(request: web.Request) -> None:
        seen["paths"].append(request.path)
        seen["headers"].append(dict(request.headers))

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": "m", "object": "model", "root": "/srv/models/m", "parent": None},
                    {"id": "my", "object": "model", "root": "/home/op/adapters/my", "parent": "m"},
                ],
            }
        )

    async def chat(request: web.Request) -> web.StreamResponse:
        await record(request)
        raw = await request.read()
        seen.setdefault("bodies", []).append(raw)
        body = json.loads(raw)
        if body.get("model") == "missing":
            return web.Response(status=404, body=VLLM_404, content_type="application/json")
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "c1",
                    "object": "chat.completion",
                    "model": "m",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "Hello"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
                }
            )
        response = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        mode = body.get("mode")
        if mode == "slow":
            try:
                for _ in range(400):
                    await response.write(CHUNKS[0])
                    await asyncio.sleep(0.025)
            except (ConnectionResetError, asyncio.CancelledError):
                seen["disconnected"].set()
                raise
            return response
        for i, chunk in enumerate(CHUNKS):
            if mode == "break" and i == 2:
                # Die mid-stream: the chunked body never completes.
                assert request.transport is not None
                request.transport.abort()
                return response
            await response.write(chunk)
        if mode == "linger":
            # vLLM writes "data: [DONE]" and the end of the chunked body separately: a client may have
            # its whole answer, and send its next request, before the upstream response has ended.
            await asyncio.sleep(0.3)
        await response.write_eof()
        return response

    async def anything(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response({"reached": request.path})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_route("*", "/{tail:.*}", anything)
    return app, seen


@pytest.fixture
def upstream(serve_aiohttp):
    app, seen = fake_vllm()
    server = serve_aiohttp(app)
    return server, seen


def test_requests_without_a_valid_key_get_401_in_the_openai_envelope(upstream, gateway_factory):
    server, seen = upstream
    gateway, key = gateway_factory(server.url)
    for headers in (
        {},
        {"authorization": "Bearer sk-kit-00000000_nope"},
        {"x-api-key": key + "x"},
        {"authorization": "Basic " + key},
    ):
        reply = httpx.get(gateway.url + "/v1/models", headers=headers)
        assert reply.status_code == 401, headers
        assert reply.json()["error"]["code"] == "invalid_api_key"
        assert reply.json()["error"]["type"] == "invalid_request_error"
    assert seen["paths"] == []
    assert (
        httpx.get(gateway.url + "/v1/models", headers={"authorization": f"Bearer {key}"}).status_code == 200
    )
    assert httpx.get(gateway.url + "/v1/models", headers={"x-api-key": key}).status_code == 200


def test_the_gateway_key_is_not_forwarded_upstream(upstream, gateway_factory):
    server, seen = upstream
    gateway, key = gateway_factory(server.url, upstream_api_key="upstream-secret")
    httpx.get(gateway.url + "/v1/models", headers={"authorization": f"Bearer {key}"})
    assert seen["headers"][-1]["Authorization"] == "Bearer upstream-secret"
    assert key not in json.dumps(seen["headers"])


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/invocations"),
        ("POST", "/v1/load_lora_adapter"),
        ("POST", "/v1/unload_lora_adapter"),
        ("POST", "/pause"),
        ("POST", "/update_weights"),
        ("POST", "/tokenize"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/v1/models/../../invocations"),
        ("POST", "/v1/chat/completions/../../invocations"),
        ("POST", "/v1/models/%2e%2e/%2e%2e/invocations"),
        ("POST", "/inference/v1/generate"),
    ],
)
def test_every_path_outside_the_allowlist_is_404_even_with_a_key(upstream, gateway_factory, method, path):
    server, seen = upstream
    gateway, key = gateway_factory(server.url)
    # http.client sends the path as written (httpx would normalise the dot segments away first).
    conn = http.client.HTTPConnection("127.0.0.1", gateway.settings.port, timeout=30)
    try:
        conn.request(
            method,
            path,
            body=b"{}",
            headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        )
        reply = conn.getresponse()
        status, error = reply.status, json.loads(reply.read())["error"]
    finally:
        conn.close()
    assert status == 404
    assert error["code"] == "not_found"
    assert urllib.parse.unquote(path) in error["message"]  # the gateway saw the path unnormalised
    assert seen["paths"] == []


def test_wrong_method_on_an_allowed_path_is_405_json(upstream, gateway_factory):
    server, _ = upstream
    gateway, key = gateway_factory(server.url)
    reply = httpx.get(gateway.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"})
    assert reply.status_code == 405
    assert reply.json()["error"]["code"] == "method_not_allowed"


def test_bodies_over_the_limit_get_413_json_declared_or_chunked(upstream, gateway_factory):
    server, seen = upstream
    gateway, key = gateway_factory(server.url, max_body_bytes=1024)
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 2048}]}).encode()
    declared = httpx.post(gateway.url + "/v1/chat/completions", content=big, headers=headers)
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "request_too_large"

    def chunked():
        yield big[:600]
        yield big[600:]

    streamed = httpx.post(gateway.url + "/v1/chat/completions", content=chunked(), headers=headers)
    assert streamed.status_code == 413
    assert streamed.headers["content-type"] == "application/json"
    assert seen["paths"] == []


def test_a_chunked_body_under_the_limit_reaches_the_upstream_whole(upstream, gateway_factory):
    server, seen = upstream
    gateway, key = gateway_factory(server.url, max_body_bytes=4096)
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "y" * 1500}]}).encode()

    def chunked():
        for at in range(0, len(body), 500):
            yield body[at : at + 500]

    answer = httpx.post(gateway.url + "/v1/chat/completions", content=chunked(), headers=headers)
    assert answer.status_code == 200, answer.text
    assert seen["bodies"][-1] == body


def test_a_body_in_several_asgi_messages_is_read_whole_and_its_limit_counts_them_all():
    async def read(parts: list[bytes], limit: int) -> bytes:
        messages = [
            {"type": "http.request", "body": part, "more_body": at < len(parts) - 1}
            for at, part in enumerate(parts)
        ]

        async def receive() -> dict:
            return messages.pop(0)

        return await read_body(receive, limit, None)

    assert asyncio.run(read([b'{"a":', b' "bc', b'd"}'], 100)) == b'{"a": "bcd"}'
    assert asyncio.run(read([b"whole"], 5)) == b"whole"
    with pytest.raises(GatewayError) as error:
        asyncio.run(read([b"12345", b"67890", b"1"], 10))
    assert error.value.status == 413


def test_upstream_down_is_503_with_retry_after(gateway_factory, down_upstream_url):
    gateway, key = gateway_factory(down_upstream_url, retry_after_s=7)
    reply = httpx.post(
        gateway.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert reply.status_code == 503
    assert reply.headers["retry-after"] == "7"
    assert reply.json()["error"]["code"] == "upstream_unavailable"
    ready = httpx.get(gateway.url + "/readyz")
    assert ready.status_code == 503
    assert ready.headers["retry-after"] == "7"


def test_upstream_error_bodies_pass_through_unchanged(upstream, gateway_factory):
    server, _ = upstream
    gateway, key = gateway_factory(server.url)
    reply = httpx.post(
        gateway.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "missing", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert reply.status_code == 404
    assert reply.content == VLLM_404


def _stream(gateway, key: str, until: bytes | None = None, **extra: Any) -> bytes:
    """A streamed chat request's raw body (``extra``: more request fields), read to its end, or only until
    ``until`` has arrived and then hung up, as clients do at ``data: [DONE]``."""
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}], **extra},
    ) as reply:
        assert reply.status_code == 200, reply.read()
        assert reply.headers["content-type"].startswith("text/event-stream")
        received = b""
        for part in reply.iter_raw():
            received += part
            if until is not None and until in received:
                break
        return received


def _ask(gateway, key: str, stream: bool) -> None:
    """One chat request answered whole (200) or streamed to its ``[DONE]``."""
    if stream:
        assert _stream(gateway, key).endswith(b"data: [DONE]\n\n")
        return
    reply = httpx.post(
        gateway.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text


def test_streams_asking_for_usage_are_forwarded_byte_for_byte_and_counted(upstream, gateway_factory):
    server, seen = upstream
    gateway, key = gateway_factory(server.url)
    body = _stream(gateway, key, stream_options={"include_usage": True})
    assert body == b"".join(CHUNKS)
    assert json.loads(seen["bodies"][-1])["stream_options"] == {"include_usage": True}
    # Only the stream has run: these counters come from its usage chunk.
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'kit_gateway_tokens_total{key="tester",model="m",type="prompt"} 7.0' in metrics
    assert 'kit_gateway_tokens_total{key="tester",model="m",type="completion"} 2.0' in metrics


def test_streams_are_counted_without_showing_the_client_a_usage_chunk_it_did_not_ask_for(
    upstream, gateway_factory
):
    # The gateway asks vLLM for usage on every stream (the ledger needs it) and drops the usage-only
    # chunk (empty choices) for clients that did not ask: some crash on it.
    server, seen = upstream
    gateway, key = gateway_factory(server.url)
    body = _stream(gateway, key)
    assert json.loads(seen["bodies"][-1])["stream_options"] == {"include_usage": True}
    assert body == CHUNKS[0] + CHUNKS[1] + CHUNKS[3]
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'kit_gateway_tokens_total{key="tester",model="m",type="prompt"} 7.0' in metrics
    assert 'kit_gateway_tokens_total{key="tester",model="m",type="completion"} 2.0' in metrics
    assert 'kit_gateway_requests_total{route="/v1/chat/completions",status="200"} 1.0' in metrics


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_database_limiter_frees_the_slot_before_the_client_has_the_answer(
    upstream, gateway_factory, monkeypatch, stream
):
    # Limits in the database settle in a thread. Slowed down here, a settle still running when the client
    # has its answer would refuse the client's next request: max_concurrent 1 would still count it.
    slow = Limiter.settle

    def slow_settle(self, *args, **kwargs):
        time.sleep(0.3)
        return slow(self, *args, **kwargs)

    monkeypatch.setattr(Limiter, "settle", slow_settle)
    server, _ = upstream
    gateway, key = gateway_factory(server.url, policy=KeyPolicy(max_concurrent=1), limits_store="database")
    for _ in range(3):
        _ask(gateway, key, stream)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_the_key_has_its_slot_back_before_the_answer_leaves(upstream, gateway_factory, monkeypatch, stream):
    # With several workers, "settled right after the send" is too late: the kernel may run the client and
    # the client's next request on another worker before this worker settles. Seen from inside: when the
    # answer's last part (or the stream's [DONE]) is handed to the server, the in-flight count is 0.
    server, _ = upstream
    gateway, key = gateway_factory(server.url, policy=KeyPolicy(max_concurrent=1), limits_store="memory")
    app = gateway.server.config.app
    counters = app.gateway.limiter.counters
    serve = app.serve
    in_flight_as_sent: list[int] = []

    async def serve_watching(scope, receive, send):
        async def send_watching(message):
            body = message.get("body", b"")
            last = b"data: [DONE]" in body if stream else bool(body) and not message.get("more_body")
            if message["type"] == "http.response.body" and last:
                in_flight_as_sent.append(counters.in_flight_of(counters.offsets("tester")[2]))
            await send(message)

        await serve(scope, receive, send_watching)

    monkeypatch.setattr(app, "serve", serve_watching)
    _ask(gateway, key, stream)
    assert in_flight_as_sent == [0]


def test_a_stream_settles_its_tokens_only_once_its_end_event_is_whole(serve_aiohttp, gateway_factory):
    # The Responses API's end event carries the usage. Split across two reads, its first part already
    # names the event: settling then would count the usage seen so far (none) instead of the real one.
    completed = (
        b'event: response.completed\ndata: {"type":"response.completed","response":{"status":"completed",'
        b'"usage":{"input_tokens":11,"output_tokens":31,"total_tokens":42}}}\n\n'
    )

    async def responses(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'event: response.created\ndata: {"type":"response.created"}\n\n')
        await response.write(completed[:60])
        await asyncio.sleep(0.2)
        await response.write(completed[60:])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/responses", responses)
    server = serve_aiohttp(app)
    gateway, key = gateway_factory(server.url, policy=KeyPolicy(tpm=100_000), limits_store="memory")
    with httpx.stream(
        "POST",
        gateway.url + "/v1/responses",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "m", "input": "hi", "stream": True, "max_output_tokens": 500},
    ) as reply:
        assert reply.status_code == 200
        assert b"".join(reply.iter_raw()).endswith(completed)
    counters = gateway.server.config.app.gateway.limiter.counters
    # The key is far from its tpm, so its worker admitted it from a lease of the counters, which goes
    # back once unused for LEASE_IDLE_S: then the counters hold exactly what the request used.
    deadline = time.monotonic() + 10
    while (minute_tokens := counters.read("tester")[2]) != 42 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert minute_tokens == 42


@pytest.mark.parametrize("limits_store", ["memory", "database"])
def test_a_client_that_hangs_up_at_done_can_send_its_next_request_at_once(
    upstream, gateway_factory, limits_store
):
    # max_concurrent 1: the slot must be free by the time the client reads [DONE], not when the upstream
    # response ends (here 0.3 s later), or the client's next request is refused with a 429.
    server, _ = upstream
    gateway, key = gateway_factory(server.url, policy=KeyPolicy(max_concurrent=1), limits_store=limits_store)
    for _ in range(3):
        body = _stream(gateway, key, until=b"data: [DONE]", mode="linger")
        assert body.endswith(b"data: [DONE]\n\n")


def test_a_stream_that_breaks_upstream_ends_with_an_error_event_not_done(upstream, gateway_factory):
    server, _ = upstream
    gateway, key = gateway_factory(server.url)
    body = _stream(gateway, key, mode="break")
    assert body.startswith(CHUNKS[0] + CHUNKS[1])
    assert b"[DONE]" not in body
    last = json.loads(body.strip().split(b"\n\n")[-1].removeprefix(b"data: "))
    assert last["error"]["type"] == "upstream_error"
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(
            model="m", stream=True, messages=[{"role": "user", "content": "hi"}], extra_body={"mode": "break"}
        ):
            pass


def test_client_disconnect_closes_the_upstream_stream(upstream, gateway_factory):
    server, seen = upstream
    gateway, key = gateway_factory(server.url)
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "m", "stream": True, "mode": "slow", "messages": [{"role": "user", "content": "hi"}]},
    ) as reply:
        next(reply.iter_raw())
    deadline = time.monotonic() + 5
    while not seen["disconnected"].is_set():
        assert time.monotonic() < deadline, "the upstream stream was still open 5 s after the client left"
        time.sleep(0.05)


def test_access_log_has_request_id_and_key_name_but_no_prompt_or_key(upstream, gateway_factory, caplog):
    server, _ = upstream
    gateway, key = gateway_factory(server.url)
    with caplog.at_level(logging.INFO, logger="serve.gateway.access"):
        reply = httpx.post(
            gateway.url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {key}", "x-request-id": "req-123"},
            json={"model": "m", "messages": [{"role": "user", "content": "my secret prompt"}]},
        )
        generated = httpx.get(gateway.url + "/healthz")
        time.sleep(0.6)  # lines are written in batches every 0.25 s
    assert reply.headers["x-request-id"] == "req-123"
    assert len(generated.headers["x-request-id"]) == 32
    records = [r.getMessage() for r in caplog.records if r.name == "serve.gateway.access"]
    lines = [json.loads(line) for record in records for line in record.splitlines()]
    entry = next(line for line in lines if line["request_id"] == "req-123")
    assert entry["key"] == "tester" and entry["model"] == "m" and entry["status"] == 200
    text = caplog.text
    assert "my secret prompt" not in text
    assert key not in text


def test_readyz_requires_the_served_model(upstream, gateway_factory):
    server, _ = upstream
    ready, _ = gateway_factory(server.url, served_model_names=["m"])
    # Ready, and naming no model or adapter: the listing is for callers with a key.
    assert httpx.get(ready.url + "/readyz").json() == {"status": "ready"}
    waiting, _ = gateway_factory(server.url, served_model_names=["other"])
    reply = httpx.get(waiting.url + "/readyz")
    assert reply.status_code == 503
    assert reply.json()["error"]["code"] == "model_not_loaded"
    assert httpx.get(waiting.url + "/healthz").status_code == 200


def test_readyz_asks_the_configured_health_path_or_only_the_listing(serve_aiohttp, gateway_factory):
    # An upstream like Ray Serve LLM's OpenAI app: a model listing, no /health.
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    server = serve_aiohttp(app)
    asking, _ = gateway_factory(server.url, served_model_names=["m"])
    reply = httpx.get(asking.url + "/readyz")
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "upstream_not_ready"
    listing_only, _ = gateway_factory(server.url, served_model_names=["m"], upstream_health_path="")
    assert httpx.get(listing_only.url + "/readyz").json() == {"status": "ready"}
    with pytest.raises(ValueError, match="must be a path starting with '/'"):
        GatewaySettings(upstream_health_path="health")


def test_per_model_chat_template_kwargs_fill_only_what_the_request_leaves_unset(upstream, gateway_factory):
    # An adapter trained without reasoning is called with thinking off; the base, and any request that
    # says otherwise, are left alone (their bodies reach vLLM byte for byte).
    server, seen = upstream
    gateway, key = gateway_factory(
        server.url, default_chat_template_kwargs={"my-adapter": {"enable_thinking": False}}
    )
    auth = {"authorization": f"Bearer {key}"}

    def send(body: dict) -> dict:
        raw = json.dumps(body, separators=(",", ":")).encode()
        reply = httpx.post(gateway.url + "/v1/chat/completions", content=raw, headers=auth)
        assert reply.status_code == 200
        return {"sent": raw, "got": seen["bodies"][-1]}

    messages = [{"role": "user", "content": "Hi"}]
    adapter = send({"model": "my-adapter", "messages": messages})
    assert json.loads(adapter["got"])["chat_template_kwargs"] == {"enable_thinking": False}
    explicit = send(
        {
            "model": "my-adapter",
            "messages": messages,
            "chat_template_kwargs": {"enable_thinking": True, "x": 1},
        }
    )
    assert explicit["got"] == explicit["sent"]
    other_kwarg = send({"model": "my-adapter", "messages": messages, "chat_template_kwargs": {"x": 1}})
    assert json.loads(other_kwarg["got"])["chat_template_kwargs"] == {"enable_thinking": False, "x": 1}
    base = send({"model": "m", "messages": messages})
    assert base["got"] == base["sent"]


def test_models_listing_does_not_reveal_server_folders(upstream, gateway_factory):
    server, _ = upstream
    gateway, key = gateway_factory(server.url)
    listing = httpx.get(gateway.url + "/v1/models", headers={"authorization": f"Bearer {key}"}).json()
    assert [(m["id"], m["root"], m["parent"]) for m in listing["data"]] == [
        ("m", "m", None),
        ("my", "my", "m"),
    ]
    assert "/srv/" not in json.dumps(listing) and "/home/" not in json.dumps(listing)


@pytest.mark.parametrize(
    ("body", "changes"),
    [
        (b'{"model": "m", "messages": []}', {"stream_options": {"include_usage": True}}),
        (b'  {"model":"m","n":2}', {"max_tokens": 5, "stream_options": {"include_usage": True}}),
        (b'{"model": "m", "max_tokens": 900}', {"max_tokens": 5}),
        (b'{"model": "m", "chat_template_kwargs": {"x": 1}}', {"chat_template_kwargs": {"x": 1, "y": 2}}),
    ],
)
def test_body_rewrites_set_exactly_the_changed_fields_and_keep_the_rest(body, changes):
    from serve.gateway.proxy import with_fields

    obj = json.loads(body)
    rewritten = with_fields(body, obj, changes)
    assert json.loads(rewritten) == {**obj, **changes}
    # A field the body lacks is spliced in: the client's bytes follow unchanged (no re-encoding).
    if not any(name in obj for name in changes):
        assert rewritten.endswith(body.strip()[1:])
    # No duplicate keys: a JSON reader keeping the first value would see the same request.
    pairs: list = []
    json.loads(rewritten, object_pairs_hook=lambda items: pairs.append([k for k, _ in items]) or dict(items))
    assert all(len(keys) == len(set(keys)) for keys in pairs)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "stream": true}',
        b'{"model": "m"}  \r\n',
        b' \n{"model": "m"}',
        b'\xef\xbb\xbf{"model": "m"}',  # a UTF-8 byte order mark
        '{"model": "é"}'.encode("utf-16"),
        b'{"model": "m"} trailing',
        b'{"model": "m"}{"model": "n"}',
        b'["model"]',
        b"\xff\xfe\xfd",
        b"{",
        b"",
    ],
)
def test_request_bodies_are_decoded_as_vllm_decodes_them(body):
    # vLLM's server reads a request with Starlette's Request.json(): json.loads on the bytes. A body the
    # gateway reads differently could carry a model past the key's policy, or lose one.
    try:
        expected = json.loads(body)
    except ValueError:
        expected = None
    assert _request_object(body) == (expected if isinstance(expected, dict) else None)


def test_the_request_head_is_read_in_one_pass_as_each_header_alone_would_be():
    from serve.gateway.proxy import Call, presented_key
    from serve.gateway.routes import ROUTES

    headers = [
        (b"host", b"gw"),
        (b"x-api-key", b"sk-from-x-api-key"),
        (b"authorization", b"Basic dXNlcjpwYXNz"),  # not a bearer key: x-api-key stands
        (b"content-type", b"application/json"),
        (b"content-length", b"42"),
        (b"x-request-id", b"client-id-1"),
        (b"anthropic-version", b"2023-06-01"),
        (b"user-agent", b"test"),
    ]
    call = Call("", ROUTES[0], 0.0, 0.0)
    assert read_head(call, headers) == "client-id-1"
    assert call.presented == presented_key({"headers": headers}) == "sk-from-x-api-key"
    assert call.declared_length == b"42"
    assert call.forward_headers == {"content-type": "application/json", "anthropic-version": "2023-06-01"}

    bearer = [(b"x-api-key", b"sk-other"), (b"authorization", b"bearer  sk-bearer ")]
    call = Call("", ROUTES[0], 0.0, 0.0)
    assert read_head(call, bearer) is None
    assert call.presented == presented_key({"headers": bearer}) == "sk-bearer"  # Bearer wins
    assert call.declared_length is None and call.forward_headers == {}
