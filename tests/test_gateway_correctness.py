"""The gateway's correctness gaps of issue #8 section 3, each against a fake upstream (and each failing on
the gateway before that issue): timeouts, clients that leave a non-streamed request, upstream response
headers, escaped exceptions, a locked key database, where settings resolve, and what is exposed."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import itertools
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from aiohttp import web

from serve.gateway.app import MissingDatabase, create_app
from serve.gateway.settings import GatewaySettings
from serve.supervisor import free_port

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "hi"}]
COMPLETION = {
    "id": "c1",
    "object": "chat.completion",
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}
VLLM_503 = b'{"error":{"message":"busy","type":"ServiceUnavailable","param":null,"code":503}}'
SSE_CHUNK = (
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
)
SLEEP_S = 2.0  # how long mode "sleep" keeps the answer back (4x the gateway's read timeout below)
STREAM_CHUNKS, STREAM_EVERY_S = 100, 0.05  # mode "long-stream": 5 s of tokens


def correctness_upstream() -> tuple[web.Application, dict[str, Any]]:
    """A stand-in for vLLM whose chat answer depends on the request's ``mode``, recording every request.

    ``seen["requests"]``: ``(path, lower-cased headers, JSON body)`` per request that reached it.
    ``seen["held"]`` / ``seen["closed"]`` (threading events): a ``hold`` request arrived / its connection
    was closed by the gateway while the upstream was still working on it.
    """
    seen: dict[str, Any] = {"requests": [], "held": threading.Event(), "closed": threading.Event()}

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(request: web.Request) -> web.Response:
        seen["requests"].append((request.path, {k.lower(): v for k, v in request.headers.items()}, None))
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        seen["requests"].append((request.path, {k.lower(): v for k, v in request.headers.items()}, body))
        mode = body.get("mode")
        if mode == "sleep":  # a long non-streamed generation: nothing is sent until it is complete
            await asyncio.sleep(SLEEP_S)
        elif mode == "hold":  # a long non-streamed generation that notices its connection closing
            seen["held"].set()
            for _ in range(200):
                transport = request.transport
                if transport is None or transport.is_closing():
                    seen["closed"].set()
                    break
                await asyncio.sleep(0.05)
        elif mode == "gzip":
            return web.Response(
                body=gzip.compress(json.dumps(COMPLETION).encode()),
                content_type="application/json",
                headers={
                    "Content-Encoding": "gzip",
                    "Keep-Alive": "timeout=5, max=100",
                    "X-Request-Id": "the-upstream-s-own-id",
                },
            )
        elif mode == "chunked":  # a non-SSE answer sent with Transfer-Encoding: chunked
            response = web.StreamResponse(
                headers={"Content-Type": "application/json", "Connection": "keep-alive"}
            )
            response.enable_chunked_encoding()
            await response.prepare(request)
            raw = json.dumps(COMPLETION).encode()
            await response.write(raw[:20])
            await response.write(raw[20:])
            await response.write_eof()
            return response
        elif mode == "busy":
            return web.Response(
                status=503, body=VLLM_503, content_type="application/json", headers={"Retry-After": "17"}
            )
        elif mode == "stall-stream":  # a stream that sends one piece and then nothing for SLEEP_S
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(SSE_CHUNK)
            await asyncio.sleep(SLEEP_S)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        elif mode == "long-stream":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for _ in range(STREAM_CHUNKS):
                await response.write(SSE_CHUNK)
                await asyncio.sleep(STREAM_EVERY_S)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        return web.json_response(COMPLETION)

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    return app, seen


@pytest.fixture
def upstream(serve_aiohttp):
    app, seen = correctness_upstream()
    return serve_aiohttp(app), seen


def _chat(mode: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MESSAGES, **({"mode": mode} if mode else {}), **extra}


def _modes(seen: dict[str, Any], mode: str) -> int:
    """How many requests of ``mode`` reached the upstream."""
    return sum(1 for _, _, body in seen["requests"] if body and body.get("mode") == mode)


def test_a_non_streamed_answer_past_the_read_timeout_is_504_without_retry_after(upstream, gateway_factory):
    server, seen = upstream
    gateway, key = gateway_factory(server.url, upstream_read_timeout_s=SLEEP_S / 4)
    reply = httpx.post(
        gateway.url + "/v1/chat/completions",
        json=_chat("sleep"),
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert reply.status_code == 504
    assert "retry-after" not in reply.headers
    assert reply.json()["error"]["code"] == "upstream_timeout"
    assert reply.headers["x-request-id"]
    assert _modes(seen, "sleep") == 1

    # The openai SDK retries every status >= 500 (its _should_retry: 408, 409, 429, >= 500) unless the
    # answer says `x-should-retry: false`, which the 504 does: one long generation runs once, not three
    # times.
    assert reply.headers["x-should-retry"] == "false"
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=2)
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="m", messages=MESSAGES, extra_body={"mode": "sleep"})
    assert raised.value.status_code == 504
    assert "retry-after" not in raised.value.response.headers
    assert _modes(seen, "sleep") == 1 + 1


def test_a_stream_whose_upstream_goes_silent_past_the_read_timeout_ends_with_an_error_event(
    upstream, gateway_factory
):
    server, _ = upstream
    gateway, key = gateway_factory(server.url, upstream_read_timeout_s=SLEEP_S / 4)
    started = time.monotonic()
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        json=_chat("stall-stream", stream=True),
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    ) as reply:
        body = b"".join(reply.iter_bytes())
    took = time.monotonic() - started
    assert reply.status_code == 200
    assert body.startswith(SSE_CHUNK)  # the piece the upstream sent came through first
    last = json.loads(body[len(SSE_CHUNK) :].removeprefix(b"data: ").strip())
    assert last["error"]["type"] == "upstream_error"
    assert f"sent nothing for {SLEEP_S / 4:g} s (setting upstream_read_timeout_s)" in last["error"]["message"]
    assert took < SLEEP_S, "the gateway waited for the upstream instead of ending the stream at the timeout"
    request_id = reply.headers["x-request-id"]
    gateway.stop()  # flushes the ledger
    with sqlite3.connect(gateway.settings.keys_db) as db:
        row = db.execute("SELECT outcome FROM usage_ledger WHERE request_id = ?", (request_id,)).fetchone()
    assert row == ("upstream_error",)


def test_a_client_leaving_a_non_streamed_request_closes_the_upstream_connection(upstream, gateway_factory):
    server, seen = upstream
    gateway, key = gateway_factory(server.url)
    conn = http.client.HTTPConnection("127.0.0.1", gateway.settings.port, timeout=30)
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(_chat("hold")),
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    assert seen["held"].wait(10), "the request never reached the upstream"
    conn.close()  # the client leaves while the upstream is still generating
    assert seen["closed"].wait(5), "the upstream connection was still open 5 s after the client left"


def test_upstream_bodies_arrive_decodable_and_the_headers_a_client_needs_are_forwarded(
    upstream, gateway_factory
):
    server, seen = upstream
    gateway, key = gateway_factory(server.url)
    auth = {"authorization": f"Bearer {key}"}

    compressed = httpx.post(gateway.url + "/v1/chat/completions", json=_chat("gzip"), headers=auth)
    assert compressed.status_code == 200
    assert compressed.headers["content-encoding"] == "gzip"
    assert compressed.json() == COMPLETION  # httpx decoded it: the encoding travelled with the bytes
    assert "keep-alive" not in compressed.headers
    # One x-request-id, the gateway's: the upstream got the same one, its own one is not forwarded.
    request_id = compressed.headers["x-request-id"]
    assert compressed.headers.get_list("x-request-id") == [request_id] != ["the-upstream-s-own-id"]
    _, sent, _ = seen["requests"][-1]
    assert sent["x-request-id"] == request_id
    assert sent["accept-encoding"] == "identity"

    given = httpx.post(
        gateway.url + "/v1/chat/completions", json=_chat(), headers={**auth, "x-request-id": "req-joined"}
    )
    assert given.headers["x-request-id"] == "req-joined"
    assert seen["requests"][-1][1]["x-request-id"] == "req-joined"

    chunked = httpx.post(gateway.url + "/v1/chat/completions", json=_chat("chunked"), headers=auth)
    assert chunked.status_code == 200
    assert chunked.json() == COMPLETION
    assert "transfer-encoding" not in chunked.headers
    assert chunked.headers["content-length"] == str(len(chunked.content))
    assert "connection" not in chunked.headers  # the upstream's; uvicorn keeps the client's alive itself

    busy = httpx.post(gateway.url + "/v1/chat/completions", json=_chat("busy"), headers=auth)
    assert busy.status_code == 503
    assert busy.headers["retry-after"] == "17"
    assert busy.content == VLLM_503


def test_an_exception_escaping_the_gateway_is_a_500_in_the_api_s_error_shape(upstream, gateway_factory):
    server, seen = upstream
    gateway, key = gateway_factory(server.url)
    # The key database turns to garbage before the first request: reading the keys raises.
    keys_db = gateway.settings.keys_db
    garbage = b"this is not a SQLite database\n" * 1024
    for path in (keys_db, keys_db.with_name(keys_db.name + "-wal")):
        path.write_bytes(garbage)
    auth = {"authorization": f"Bearer {key}"}

    openai_reply = httpx.post(gateway.url + "/v1/chat/completions", json=_chat(), headers=auth)
    assert openai_reply.status_code == 500
    assert openai_reply.headers["content-type"] == "application/json"
    request_id = openai_reply.headers["x-request-id"]
    error = openai_reply.json()["error"]
    assert error["code"] == "internal_error"
    assert request_id in error["message"]

    anthropic_reply = httpx.post(
        gateway.url + "/v1/messages",
        json={"model": "m", "max_tokens": 8, "messages": MESSAGES},
        headers={"x-api-key": key, "anthropic-version": "2023-06-01", "x-request-id": "req-500"},
    )
    assert anthropic_reply.status_code == 500
    assert anthropic_reply.headers["x-request-id"] == "req-500"
    body = anthropic_reply.json()
    assert body["type"] == "error" and body["error"]["type"] == "api_error"
    assert "req-500" in body["error"]["message"]
    assert seen["requests"] == []
    # The ledger cannot reach its database either: at shutdown both rows go to the spill file, marked as
    # the gateway's own failure.
    gateway.stop()
    spilled = [json.loads(line) for f in keys_db.parent.glob("ledger-spill-*.jsonl") for line in f.open()]
    assert {(r["request_id"], r["status"], r["outcome"]) for r in spilled} == {
        (request_id, 500, "error"),
        ("req-500", 500, "error"),
    }


def _hold_write_lock(keys_db: Path, hold_s: float, held: threading.Event, times: dict[str, float]) -> None:
    """What a CLI write does to the key database, held for ``hold_s``: SQLite's exclusive write lock."""
    connection = sqlite3.connect(str(keys_db), timeout=30, isolation_level=None)
    try:
        connection.execute("BEGIN EXCLUSIVE")
        times["locked"] = time.monotonic()
        held.set()
        time.sleep(hold_s)
        connection.execute("ROLLBACK")
        times["unlocked"] = time.monotonic()
    finally:
        connection.close()


def test_a_cli_write_holding_the_key_database_lock_does_not_stall_a_stream(upstream, gateway_factory):
    server, _ = upstream
    # A tiny key cache TTL: every request while the lock is held makes the gateway read the keys again.
    gateway, key = gateway_factory(server.url, key_cache_ttl_s=0.05)
    auth = {"authorization": f"Bearer {key}"}
    held, times = threading.Event(), {}
    statuses: list[tuple[float, int]] = []
    locker = threading.Thread(target=_hold_write_lock, args=(gateway.settings.keys_db, 3.0, held, times))

    def other_requests() -> None:
        # Requests that need the keys read again while the lock is held (how long they wait is not
        # this test's point: only that the stream in progress keeps flowing meanwhile).
        held.wait(10)
        while "unlocked" not in times:
            sent = time.monotonic()
            reply = httpx.get(gateway.url + "/v1/models", headers=auth, timeout=60)
            statuses.append((sent, reply.status_code))
            time.sleep(0.1)

    others = threading.Thread(target=other_requests)
    arrivals = []
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json=_chat("long-stream", stream=True), headers=auth
    ) as reply:
        assert reply.status_code == 200
        for chunk in reply.iter_raw():
            arrivals.append((time.monotonic(), chunk))
            if len(arrivals) == 1:
                locker.start()
                others.start()
    locker.join(30)
    others.join(60)
    body = b"".join(chunk for _, chunk in arrivals)
    assert body.endswith(b"data: [DONE]\n\n") and body.count(SSE_CHUNK) == STREAM_CHUNKS
    assert arrivals[0][0] < times["locked"] and times["unlocked"] < arrivals[-1][0], "lock outside the stream"
    assert statuses and {status for _, status in statuses} == {200}, statuses
    assert times["locked"] <= statuses[0][0] < times["unlocked"], "no key read while the lock was held"
    gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(arrivals)]
    assert max(gaps) < 1.0, f"the stream stalled for {max(gaps):.2f} s while the key database was locked"


def _settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No environment that would change where settings come from."""
    for name in list(os.environ):
        if name.startswith("KIT_GATEWAY_") or name == "KIT_ROOT":
            monkeypatch.delenv(name)


def test_settings_resolve_against_the_kit_root_whatever_the_current_directory(tmp_path, monkeypatch):
    _settings_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    settings = GatewaySettings(keys_db="state/x.sqlite")
    assert settings.keys_db == ROOT / "state" / "x.sqlite"
    shipped = yaml.safe_load((ROOT / "configs" / "gateway.yaml").read_text())
    assert settings.port == shipped["port"]  # configs/gateway.yaml was found from elsewhere too
    assert settings.host == shipped["host"] == "127.0.0.1"  # loopback unless told otherwise


def test_a_missing_key_database_is_refused_unless_creating_it_is_asked_for(tmp_path, monkeypatch):
    _settings_env(monkeypatch)
    missing = tmp_path / "state" / "nowhere.sqlite"
    with pytest.raises(MissingDatabase) as raised:
        create_app(GatewaySettings(keys_db=missing))
    message = str(raised.value)
    assert str(missing) in message
    assert "make key NAME=" in message and "create_keys_db" in message
    assert not missing.exists()

    env = {**os.environ, "KIT_GATEWAY_KEYS_DB": str(missing), "KIT_GATEWAY_PORT": str(free_port())}
    run = subprocess.run(
        [sys.executable, "-m", "serve.cli", "gateway"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert str(missing) in run.stderr and "make key NAME=" in run.stderr and "create_keys_db" in run.stderr
    assert "Traceback" not in run.stderr
    assert not missing.exists()

    create_app(GatewaySettings(keys_db=missing, create_keys_db=True))
    with sqlite3.connect(missing) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "api_keys" in tables


def test_metrics_need_the_metrics_key_when_one_is_set(upstream, gateway_factory):
    server, _ = upstream
    gateway, key = gateway_factory(server.url, metrics_key="metrics-secret")
    for headers in ({}, {"authorization": f"Bearer {key}"}, {"authorization": "Bearer metrics-wrong"}):
        reply = httpx.get(gateway.url + "/metrics", headers=headers)
        assert reply.status_code == 401, headers
        assert reply.json()["error"]["code"] == "invalid_api_key"
        assert "kit_gateway_requests" not in reply.text
    allowed = httpx.get(gateway.url + "/metrics", headers={"authorization": "Bearer metrics-secret"})
    assert allowed.status_code == 200
    assert "kit_gateway_requests_total" in allowed.text


def test_readyz_names_no_model(upstream, gateway_factory):
    server, _ = upstream
    gateway, _ = gateway_factory(server.url, served_model_names=["m"])
    reply = httpx.get(gateway.url + "/readyz")
    assert reply.status_code == 200
    assert reply.json() == {"status": "ready"}
