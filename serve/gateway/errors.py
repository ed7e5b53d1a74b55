"""Every error the gateway itself answers, shaped for the API the client speaks, in one place.

OpenAI routes get the OpenAI envelope ``{"error": {"message", "type", "param", "code"}}`` (as vLLM's
``ErrorResponse``); Anthropic routes (``/v1/messages...``) get ``{"type": "error", "error": {"type",
"message"}}`` with Anthropic's error types, which the ``anthropic`` SDK maps to its exception classes
(docs.anthropic.com, "Errors": 400 invalid_request_error, 401 authentication_error, 403 permission_error,
404 not_found_error, 413 request_too_large, 429 rate_limit_error, 500 api_error, 529 overloaded_error).
Upstream error bodies are never rewritten: they pass through as vLLM sent them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from starlette.types import Send

ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
}


@dataclass
class GatewayError(Exception):
    """An error answered by the gateway, not the upstream.

    Attributes:
        status: HTTP status.
        message: what was wrong and what to do, for the client.
        type: the OpenAI envelope's ``type`` (Anthropic's type comes from ``status``).
        code: the OpenAI envelope's ``code``.
        param: the request field at fault, if one is.
        headers: extra response headers (``retry-after``...).
    """

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self, api: str) -> bytes:
        """The JSON body for ``api`` (``openai`` or ``anthropic``)."""
        return error_body(api, self.status, self.message, self.type, self.code, self.param)


def error_body(
    api: str, status: int, message: str, type_: str, code: str | None = None, param: str | None = None
) -> bytes:
    """An error body in ``api``'s shape as JSON bytes."""
    if api == "anthropic":
        kind = ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


async def send_error(send: Send, api: str, error: GatewayError, *extra: tuple[bytes, bytes]) -> None:
    """Answer ``error`` on an ASGI ``send`` in ``api``'s shape, with the ``extra`` headers."""
    headers = [(b"content-type", b"application/json")]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
    headers.extend(extra)
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": error.body(api), "more_body": False})


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


def unauthorized() -> GatewayError:
    return GatewayError(
        401,
        "Missing or invalid API key. Send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'; "
        "an admin creates keys with `make key NAME=...`.",
        "invalid_request_error",
        "invalid_api_key",
        headers={"www-authenticate": "Bearer"},
    )


def too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"Request body is larger than the gateway's limit of {limit} bytes (setting max_body_bytes).",
        "invalid_request_error",
        "request_too_large",
    )


def unavailable(detail: str, retry_after_s: int, code: str = "upstream_unavailable") -> GatewayError:
    """503 with ``Retry-After``: the model server is down, starting, or missing the model."""
    return GatewayError(
        503,
        f"The model server is not available ({detail}); retry shortly.",
        "service_unavailable",
        code,
        headers={"retry-after": str(retry_after_s)},
    )


def timed_out(timeout_s: float) -> GatewayError:
    """504 without ``Retry-After`` and with ``x-should-retry: false``: the upstream was silent for
    ``timeout_s`` (retrying would repeat the whole generation). The openai and anthropic SDKs retry
    every 5xx unless that header says not to (their ``_should_retry``)."""
    return GatewayError(
        504,
        f"The model server sent nothing for {timeout_s:g} s (setting upstream_read_timeout_s); the "
        "generation may be longer than that: stream it, lower max_tokens, or raise the timeout.",
        "timeout_error",
        "upstream_timeout",
        headers={"x-should-retry": "false"},
    )


def internal(request_id: str) -> GatewayError:
    """500 for an exception the gateway did not expect; the log has the traceback under the id."""
    return GatewayError(
        500,
        f"The gateway failed on this request (request id {request_id}); its log has the details.",
        "internal_error",
        "internal_error",
    )
