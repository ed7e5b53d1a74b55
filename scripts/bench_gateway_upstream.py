"""A fast fake OpenAI server for `make bench-gateway`: fixed replies, no work per request.

    python scripts/bench_gateway_upstream.py [--port 0] [--chunks 32]    # prints "listening <port>"

Answers ``POST /v1/chat/completions`` with one fixed chat completion, or, when the body has
``"stream": true``, with a fixed SSE stream (``chunks`` events: role, ``chunks - 2`` tokens, finish; then
a usage event and ``data: [DONE]``), each event in its own HTTP chunk, all in one write. Also
``GET /health`` and ``GET /v1/models`` (the gateway's ``/readyz`` asks both). HTTP/1.1 keep-alive on a
raw asyncio protocol with uvloop: every reply is built once at start, so the server costs a few
microseconds per request and the benchmark measures the gateway, not this.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from typing import cast

MODEL = "bench-model"
_ID, _CREATED = "chatcmpl-bench0001", 1700000000
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked", re.I)
_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.I)
_STREAM = re.compile(rb'"stream"\s*:\s*true')


def expected_text(chunks: int) -> str:
    """The assistant text every reply carries, streamed or not."""
    return "".join(f"tok{i} " for i in range(chunks - 2))


def _dump(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _response(status: str, content_type: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body


def build_replies(chunks: int) -> dict[str, bytes]:
    """Whole HTTP responses, keyed ``json``, ``stream``, ``health``, ``models``, ``not_found``, ``411``."""
    tokens = [f"tok{i} " for i in range(chunks - 2)]
    usage = {"prompt_tokens": 12, "completion_tokens": len(tokens), "total_tokens": 12 + len(tokens)}
    common = {"id": _ID, "created": _CREATED, "model": MODEL}

    def event(delta: dict[str, str], finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + _dump({**common, "object": "chat.completion.chunk", "choices": [choice]}) + b"\n\n"

    events = [event({"role": "assistant", "content": ""}, None)]
    events += [event({"content": t}, None) for t in tokens]
    events.append(event({}, "stop"))
    events.append(
        b"data: " + _dump({**common, "object": "chat.completion.chunk", "choices": [], "usage": usage})
    )
    events[-1] += b"\n\n"
    events.append(b"data: [DONE]\n\n")
    stream = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    stream += b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    message = {"role": "assistant", "content": "".join(tokens)}
    completion = {
        **common,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
        "usage": usage,
    }
    models = {
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": _CREATED, "owned_by": "bench"}],
    }

    def error_reply(status: str, message: str) -> bytes:
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
        return _response(status, "application/json", _dump({"error": error}))

    return {
        "json": _response("200 OK", "application/json", _dump(completion)),
        "stream": stream,
        "health": _response("200 OK", "application/json", b"{}"),
        "models": _response("200 OK", "application/json", _dump(models)),
        "not_found": error_reply("404 Not Found", "the bench upstream has no such route"),
        "411": error_reply("411 Length Required", "the bench upstream reads content-length bodies only"),
    }


class _Server(asyncio.Protocol):
    """One connection: parse requests as they complete (pipelining allowed), write the fixed reply."""

    def __init__(self, replies: dict[str, bytes]) -> None:
        self.replies = replies
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buf = self.buf
        buf += data
        while (end_of_head := buf.find(b"\r\n\r\n")) >= 0:
            head = bytes(buf[:end_of_head])
            if _CHUNKED.search(head):
                self.transport.write(self.replies["411"])
                self.transport.close()
                return
            match = _CONTENT_LENGTH.search(head)
            end = end_of_head + 4 + (int(match.group(1)) if match else 0)
            if len(buf) < end:
                return
            body = bytes(buf[end_of_head + 4 : end])
            del buf[:end]
            self.transport.write(self.replies[self._route(head, body)])
            if _CLOSE.search(head):
                self.transport.close()
                return

    @staticmethod
    def _route(head: bytes, body: bytes) -> str:
        method, path = head.split(b" ", 2)[:2]
        path = path.split(b"?", 1)[0]
        if method == b"POST" and path == b"/v1/chat/completions":
            return "stream" if _STREAM.search(body) else "json"
        if method == b"GET" and path == b"/health":
            return "health"
        if method == b"GET" and path == b"/v1/models":
            return "models"
        return "not_found"


async def serve(port: int, chunks: int) -> None:
    """Listen on 127.0.0.1:``port`` (0: any free port), print ``listening <port>``, serve forever."""
    replies = build_replies(chunks)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Server(replies), "127.0.0.1", port, backlog=1024)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=32, help="stream events before usage and [DONE]")
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.port, args.chunks))


if __name__ == "__main__":
    main()
