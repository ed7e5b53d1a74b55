"""OpenAI-shaped error bodies (``{"error": {"message", "type", "param", "code"}}``, as vLLM's
``ErrorResponse``) and the per-API error events that end a broken stream."""

from __future__ import annotations

import json

from starlette.responses import Response


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    """The OpenAI error envelope as JSON bytes."""
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


def error_response(
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """A JSON error response in the OpenAI envelope."""
    return Response(error_body(message, type_, code), status, headers=headers, media_type="application/json")


def stream_error_event(api: str, message: str) -> bytes:
    """The SSE event that tells a streaming client the stream broke (never a normal finish).

    Args:
        api: ``anthropic`` for ``/v1/messages`` (the SDK raises on ``event: error``), otherwise OpenAI
            framing (the SDK raises on a ``data:`` chunk holding ``error``); no ``[DONE]`` follows.
        message: what went wrong, for the client.
    """
    if api == "anthropic":
        data = json.dumps({"type": "error", "error": {"type": "api_error", "message": message}})
        return f"event: error\ndata: {data}\n\n".encode()
    data = json.dumps({"error": {"message": message, "type": "upstream_error", "param": None, "code": 502}})
    return f"data: {data}\n\n".encode()
