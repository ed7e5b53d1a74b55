"""A fake OpenAI chat server for `make soak-ledger` when real vLLM is not used (``--upstream fake``).

    python scripts/soak_ledger_upstream.py --uds /tmp/run/fake.sock [--token-delay-ms 5]

Answers ``POST /v1/chat/completions`` like vLLM does, one token per ``--token-delay-ms``: ``max_tokens``
tokens (default 16), then ``finish_reason: "length"``. Streamed: real SSE, one event per write (a role
chunk, one chunk per token, a finish chunk, a usage-only chunk with ``"choices": []`` when
``stream_options.include_usage`` is set, then ``data: [DONE]``). Not streamed: the whole completion with
its ``usage`` after the same time. A client that leaves cancels the generation (aiohttp cancels the
handler). Also ``GET /health`` and ``GET /v1/models`` (the gateway's ``/readyz`` asks both).

Listens on a Unix socket (as the kit serves vLLM) or on ``--port``; prints ``listening`` once bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from aiohttp import web

MODEL = "soak-fake"


def prompt_tokens(body: dict[str, object]) -> int:
    """A deterministic prompt size: words of every message's text plus a per-message overhead."""
    messages = body.get("messages")
    count = 0
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            count += 4 + (len(content.split()) if isinstance(content, str) else 0)
    return max(count, 1)


def _event(obj: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def build_app(token_delay_s: float) -> web.Application:
    """The fake server's routes."""

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": MODEL, "object": "model", "root": MODEL, "parent": None}]}
        )

    async def chat(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": {"message": "bad JSON", "code": 400}}, status=400)
        tokens = body.get("max_tokens") or 16
        prompt = prompt_tokens(body)
        usage = {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}
        common = {"id": f"chatcmpl-{request.headers.get('x-request-id', 'x')}", "created": int(time.time())}
        common["model"] = body.get("model", MODEL)
        if not body.get("stream"):
            await asyncio.sleep(tokens * token_delay_s)
            text = "".join(f"t{i} " for i in range(tokens))
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "length",
            }
            return web.json_response(
                {**common, "object": "chat.completion", "choices": [choice], "usage": usage}
            )
        chunk = {**common, "object": "chat.completion.chunk"}
        response = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        await response.write(
            _event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        )
        for i in range(tokens):
            await asyncio.sleep(token_delay_s)
            await response.write(_event({**chunk, "choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}))
        await response.write(
            _event({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        )
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            await response.write(_event({**chunk, "choices": [], "usage": usage}))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--uds", type=Path, help="listen on this Unix socket")
    where.add_argument("--port", type=int, help="listen on 127.0.0.1:PORT")
    parser.add_argument("--token-delay-ms", type=float, default=5.0, help="time per generated token")
    args = parser.parse_args()
    app = build_app(args.token_delay_ms / 1000)
    if args.uds is not None:
        args.uds.unlink(missing_ok=True)  # left by a killed predecessor (the caller checked nobody listens)
        web.run_app(app, path=str(args.uds), print=lambda *_: print("listening", flush=True))
    else:
        web.run_app(app, host="127.0.0.1", port=args.port, print=lambda *_: print("listening", flush=True))


if __name__ == "__main__":
    main()
