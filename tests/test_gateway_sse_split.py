"""SSE robustness of the gateway's stream relay, against an upstream written for this test: however the
upstream's bytes are cut into network reads, every event reaches the client intact and in order, and the
ledger counts the upstream's usage.

The upstream writes a whole stream either byte by byte (a write and a drain per byte, a pause between
them, so events, ``data:`` prefixes, the ``\\n\\n`` separators, the ``"usage"`` marker and multi-byte UTF-8
characters are all cut across reads) or in a single write (several events in one read). For an OpenAI
chat stream the client either asked for ``stream_options.include_usage`` (it gets the upstream's bytes
unchanged, usage-only chunk included) or did not (it gets the same bytes without that one chunk, which
the gateway asked vLLM for itself); either way the ledger row has the upstream's prompt and completion
tokens. For an Anthropic stream the bytes pass unchanged, and the thinking text, reassembled from its
split ``thinking_delta`` events, reaches the tokenizer count whole.

Streams whose ledger rows are checked are read to their end with httpx; the official SDKs parse the same
split streams too. The openai SDK hangs up as soon as it reads ``data: [DONE]``, before the upstream's
response has ended: the last test checks that the ledger still shows a complete answer (the gateway
treats a disconnect after the stream's end event as the client being done, not leaving early).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx
import openai
import pytest
from aiohttp import web

from tests.test_gateway_policy import messages_body
from tests.test_ledger import stopped_ledger

PIECES = ["Bon", "jour — ", "東京", " et Zürich ", "🌤", "!"]
TEXT = "".join(PIECES)
USAGE = {"prompt_tokens": 13, "completion_tokens": 7, "total_tokens": 20}
THINKING_PIECES = ["Il pleut à ", "東京; ", "je réponds ", "🌧."]
THINKING = "".join(THINKING_PIECES)
ANTHROPIC_USAGE = {"input_tokens": 12, "output_tokens": 30}
BYTE_PAUSE_S = 0.001  # between two one-byte writes: each lands in a read of its own
LINGER_S = 1.0  # mode "linger": how long the upstream keeps its response open after the last event


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return head + b"data: " + payload.encode() + b"\n\n"


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return sse(
        {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}
    )


def chat_stream(include_usage: bool) -> list[bytes]:
    """A chat stream as vLLM writes it: role, content pieces, the finish, the usage-only chunk when
    ``include_usage`` was asked for, ``[DONE]``."""
    events = [chat_chunk({"role": "assistant", "content": ""})]
    events += [chat_chunk({"content": piece}) for piece in PIECES[:-1]]
    events.append(chat_chunk({"content": PIECES[-1]}, finish="length"))
    if include_usage:
        usage_only = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        events.append(sse({**usage_only, "choices": [], "usage": USAGE}))
    events.append(sse("[DONE]"))
    return events


def messages_stream() -> list[bytes]:
    """A ``/v1/messages`` stream as vLLM writes it: a thinking block in pieces, a text block, the usage."""
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "m",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": ANTHROPIC_USAGE["input_tokens"], "output_tokens": 0},
        },
    }
    events = [sse(start, "message_start")]
    thinking_block = {"type": "thinking", "thinking": "", "signature": ""}
    events.append(
        sse(
            {"type": "content_block_start", "index": 0, "content_block": thinking_block},
            "content_block_start",
        )
    )
    for piece in THINKING_PIECES:
        delta = {"type": "thinking_delta", "thinking": piece}
        events.append(sse({"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta"))
    signature = {"type": "signature_delta", "signature": "c2lnbmF0dXJl"}
    events.append(sse({"type": "content_block_delta", "index": 0, "delta": signature}, "content_block_delta"))
    events.append(sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
    text_block = {"type": "text", "text": ""}
    events.append(
        sse({"type": "content_block_start", "index": 1, "content_block": text_block}, "content_block_start")
    )
    for piece in PIECES:
        delta = {"type": "text_delta", "text": piece}
        events.append(sse({"type": "content_block_delta", "index": 1, "delta": delta}, "content_block_delta"))
    events.append(sse({"type": "content_block_stop", "index": 1}, "content_block_stop"))
    finish = {"stop_reason": "end_turn", "stop_sequence": None}
    events.append(
        sse(
            {
                "type": "message_delta",
                "delta": finish,
                "usage": {"output_tokens": ANTHROPIC_USAGE["output_tokens"]},
            },
            "message_delta",
        )
    )
    events.append(sse({"type": "message_stop"}, "message_stop"))
    return events


@dataclass
class Upstream:
    """What the test's upstream saw: each chat/messages request body, and each text sent to ``/tokenize``."""

    bodies: list[dict[str, Any]] = field(default_factory=list)
    tokenized: list[str] = field(default_factory=list)


def splitting_upstream() -> tuple[web.Application, Upstream]:
    """vLLM's streaming routes, writing each stream as the request's ``mode`` says: ``bytes`` (one byte
    per write), ``whole`` (the whole stream in one write) or ``linger`` (one write, then the response
    stays open ``LINGER_S`` before it ends). ``/tokenize`` counts characters, so a garbled or partial
    text gives another count."""
    seen = Upstream()

    async def write(request: web.Request, mode: str, events: list[bytes]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        data = b"".join(events)
        if mode == "bytes":
            for i in range(len(data)):
                await response.write(data[i : i + 1])  # write() drains
                await asyncio.sleep(BYTE_PAUSE_S)
        else:
            await response.write(data)
            if mode == "linger":
                await asyncio.sleep(LINGER_S)
        await response.write_eof()
        return response

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.bodies.append(body)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await write(request, body["mode"], chat_stream(include_usage))

    async def messages(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.bodies.append(body)
        return await write(request, body["mode"], messages_stream())

    async def tokenize(request: web.Request) -> web.Response:
        prompt = (await request.json())["prompt"]
        seen.tokenized.append(prompt)
        return web.json_response({"count": len(prompt), "max_model_len": 4096, "tokens": []})

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    return app, seen


@pytest.fixture
def upstream(serve_aiohttp: Callable[[web.Application], Any]) -> tuple[Any, Upstream]:
    app, seen = splitting_upstream()
    return serve_aiohttp(app), seen


def read_stream(gateway: Any, key: str, path: str, body: dict[str, Any], request_id: str) -> list[bytes]:
    """POST ``body`` and read the streamed answer to its very end; the pieces as the client received them."""
    with httpx.stream(
        "POST",
        gateway.url + path,
        headers={"authorization": f"Bearer {key}", "x-request-id": request_id},
        json=body,
        timeout=60,
    ) as reply:
        assert reply.status_code == 200, reply.read()
        assert reply.headers["content-type"].startswith("text/event-stream")
        return list(reply.iter_raw())


def chat_body(mode: str, include_usage: bool | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "m",
        "stream": True,
        "mode": mode,
        "messages": [{"role": "user", "content": "hi"}],
    }
    if include_usage is not None:
        body["stream_options"] = {"include_usage": include_usage}
    return body


@pytest.mark.parametrize("mode", ["bytes", "whole"])
@pytest.mark.parametrize("include_usage", [True, False, None], ids=["asked", "declined", "unset"])
def test_a_split_or_whole_chat_stream_arrives_intact_and_its_usage_is_in_the_ledger(
    upstream: tuple[Any, Upstream], gateway_factory: Callable[..., Any], mode: str, include_usage: bool | None
):
    server, seen = upstream
    gateway, key = gateway_factory(server.url)
    pieces = read_stream(gateway, key, "/v1/chat/completions", chat_body(mode, include_usage), "split")
    # The gateway asked the upstream for usage whatever the client said (the ledger needs it).
    assert seen.bodies[-1]["stream_options"]["include_usage"] is True
    # Asked: what the upstream wrote, byte for byte; else the same without the usage-only chunk.
    upstream_events = chat_stream(include_usage=True)
    expected = upstream_events if include_usage else [e for e in upstream_events if b'"usage"' not in e]
    received = b"".join(pieces)
    assert received.split(b"\n\n")[:-1] == [e.removesuffix(b"\n\n") for e in expected]
    assert received == b"".join(expected)
    if mode == "bytes" and include_usage:
        # The premise: the stream really came in pieces, and the gateway sent them on as they came.
        assert len(pieces) > len(expected), f"{len(pieces)} pieces for {len(expected)} events"

    row = stopped_ledger(gateway)["split"]
    assert (row["status"], row["outcome"], row["stream"]) == (200, "ok", True)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        USAGE["prompt_tokens"],
        USAGE["completion_tokens"],
    )
    assert row["finish_reason"] == "length"


@pytest.mark.parametrize("mode", ["bytes", "whole"])
@pytest.mark.parametrize("include_usage", [True, False], ids=["asked", "not-asked"])
def test_the_openai_sdk_parses_a_split_or_whole_chat_stream(
    upstream: tuple[Any, Upstream], gateway_factory: Callable[..., Any], mode: str, include_usage: bool
):
    server, _ = upstream
    gateway, key = gateway_factory(server.url)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": include_usage},
            extra_body={"mode": mode},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage_chunks = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert usage_chunks == [chunks[-1]] and chunks[-1].choices == []
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
            USAGE["prompt_tokens"],
            USAGE["completion_tokens"],
        )
    else:
        assert usage_chunks == [] and all(c.choices for c in chunks)


@pytest.mark.parametrize("mode", ["bytes", "whole"])
def test_a_split_or_whole_anthropic_stream_arrives_intact_and_its_thinking_is_counted_whole(
    upstream: tuple[Any, Upstream], gateway_factory: Callable[..., Any], mode: str
):
    server, seen = upstream
    gateway, key = gateway_factory(server.url)
    body = messages_body(max_tokens=64, stream=True, mode=mode)
    received = b"".join(read_stream(gateway, key, "/v1/messages", body, "split"))
    assert received == b"".join(messages_stream())

    client = anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0)
    with client.messages.stream(
        model="m", max_tokens=64, messages=[{"role": "user", "content": "hi"}], extra_body={"mode": mode}
    ) as stream:
        final = stream.get_final_message()
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == THINKING  # type: ignore[union-attr]
    assert final.content[1].text == TEXT  # type: ignore[union-attr]
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        ANTHROPIC_USAGE["input_tokens"],
        ANTHROPIC_USAGE["output_tokens"],
    )

    row = stopped_ledger(gateway)["split"]
    assert (row["status"], row["outcome"], row["stream"], row["route"]) == (200, "ok", True, "/v1/messages")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        ANTHROPIC_USAGE["input_tokens"],
        ANTHROPIC_USAGE["output_tokens"],
    )
    # The thinking text went to the tokenizer whole: every split piece, multi-byte characters intact.
    assert seen.tokenized[0] == THINKING
    assert row["reasoning_tokens"] == len(THINKING)


def test_a_client_hanging_up_after_done_got_the_whole_answer_and_the_ledger_says_ok(
    upstream: tuple[Any, Upstream], gateway_factory: Callable[..., Any]
):
    server, _ = upstream
    gateway, key = gateway_factory(server.url)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_body={"mode": "linger"},
            extra_headers={"x-request-id": "hung-up-after-done"},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    row = stopped_ledger(gateway)["hung-up-after-done"]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        USAGE["prompt_tokens"],
        USAGE["completion_tokens"],
    )
    assert (row["status"], row["outcome"]) == (200, "ok")


def test_a_client_hanging_up_after_message_stop_got_the_whole_answer_and_the_ledger_says_ok(
    upstream: tuple[Any, Upstream], gateway_factory: Callable[..., Any]
):
    # Anthropic streams end with `message_stop`, not `[DONE]`: a client that closes the connection once it
    # has read that event, while the upstream keeps its response open, left nothing unread.
    server, _ = upstream
    gateway, key = gateway_factory(server.url)
    body = messages_body(max_tokens=64, stream=True, mode="linger")
    received = b""
    with httpx.stream(
        "POST",
        gateway.url + "/v1/messages",
        headers={"x-api-key": key, "x-request-id": "hung-up-after-stop"},
        json=body,
        timeout=60,
    ) as reply:
        for piece in reply.iter_raw():
            received += piece
            if b"event: message_stop" in received:
                break  # leaving the block closes the connection, LINGER_S before the upstream ends
    assert received == b"".join(messages_stream())
    row = stopped_ledger(gateway)["hung-up-after-stop"]
    assert (row["status"], row["outcome"], row["route"]) == (200, "ok", "/v1/messages")
