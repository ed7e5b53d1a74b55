"""A property-based pass over the gateway's routes (hypothesis): bad bodies, headers and paths never
make the gateway itself fail. Behind it is an upstream that answers every request 200 (a chat
completion, or a stream when the body asks for one), so any 5xx the client sees is the gateway's own.

Bodies are JSON objects whose fields the gateway reads (``model``, ``stream``, ``stream_options``,
output caps, ``n``, ``chat_template_kwargs``, ``thinking``, ``response_format``,
``thinking_token_budget``) filled with values of every JSON type, plus arbitrary bytes; headers carry
odd keys, ids, content types and lengths; paths include traversal and encodings. The key has every
policy set (caps, limits, thinking budget, a model list), so every policy branch sees the values.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve.gateway.keys import KeyPolicy, KeyStore
from serve.gateway.settings import GatewaySettings
from serve.supervisor import free_port
from tests.conftest import ThreadedAiohttp, ThreadedGateway

ROUTES = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
]
FIELDS = [
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "chat_template_kwargs",
    "thinking",
    "response_format",
    "thinking_token_budget",
    "messages",
    "temperature",
]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from([*FIELDS, "type", "include_usage", "enable_thinking", "budget_tokens"]),
            inner,
            max_size=3,
        )
    ),
    max_leaves=8,
)
bodies = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6).map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=64),
    st.sampled_from([b"", b"{", b"[]", b"null", b'{"model": "m", "stream": true, "n": 1e400}', b"\xff\xfe"]),
)
# Printable, without the edge spaces HTTP clients refuse to send.
header_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(
    str.strip
)


def _any_upstream() -> web.Application:
    chat = {
        "id": "c1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
    }

    async def anything(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if b'"stream": true' in raw or b'"stream":true' in raw:
            response = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b'data: {"choices":[{"delta":{"content":"ok"}}]}\n\n')
            await response.write(
                b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
            )
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        return web.json_response({**chat, "data": [{"id": "m", "object": "model"}]})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    return app


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """The gateway in front of the answer-anything upstream, and a key with every policy set."""
    upstream = ThreadedAiohttp(_any_upstream()).start()
    db = tmp_path_factory.mktemp("fuzz") / "keys.sqlite"
    policy = KeyPolicy(
        models=("m", "team-*"),
        rpm=10**9,
        tpm=10**12,
        max_concurrent=1000,
        budget_day=10**15,
        max_tokens=512,
        clamp_max_tokens=True,
        max_n=2,
        enable_thinking=False,
        thinking_budget=2048,
    )
    key = KeyStore(db).create("fuzzer", policy)
    settings_ = GatewaySettings(
        upstream_url=upstream.url,
        port=free_port(),
        keys_db=db,
        model_aliases={"claude-*": "m", "gpt-4o": "team-a"},
        non_thinking_sampling={"m": {"temperature": 0.7, "top_p": 0.8}},
    )
    gateway = ThreadedGateway(settings_).start()
    try:
        yield gateway.url, key
    finally:
        gateway.stop()
        upstream.stop()


def _assert_not_the_gateways_fault(reply: httpx.Response, what: Any) -> None:
    assert reply.status_code < 500, (reply.status_code, reply.text[:300], what)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES), body=bodies)
def test_no_body_makes_the_gateway_fail(target: tuple[str, str], route: str, body: bytes) -> None:
    url, key = target
    reply = httpx.post(
        url + route,
        content=body,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        timeout=30,
    )
    _assert_not_the_gateways_fault(reply, body)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    auth=st.one_of(st.none(), header_values, st.just("Bearer"), st.just("bearer sk-kit-x")),
    api_key=st.one_of(st.none(), header_values),
    request_id=st.one_of(st.none(), header_values),
    content_type=st.one_of(st.none(), header_values),
)
def test_no_headers_make_the_gateway_fail(
    target: tuple[str, str],
    auth: str | None,
    api_key: str | None,
    request_id: str | None,
    content_type: str | None,
) -> None:
    url, key = target
    headers = {"authorization": auth or f"Bearer {key}"}
    for name, value in (("x-api-key", api_key), ("x-request-id", request_id), ("content-type", content_type)):
        if value is not None:
            headers[name] = value
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    reply = httpx.post(url + "/v1/chat/completions", content=body, headers=headers, timeout=10)
    _assert_not_the_gateways_fault(reply, headers)


@pytest.mark.parametrize(
    ("length", "expected"), [("99999999999", 413), ("abc", 400), ("-1", 400), ("999", None)]
)
def test_a_lying_content_length_is_refused_not_failed_on(
    target: tuple[str, str], length: str, expected: int | None
) -> None:
    """Raw bytes on a socket (HTTP clients will not send a wrong length): a declared length past the body
    limit is 413 before any byte is read; one the HTTP parser rejects is its 400; one longer than what is
    sent leaves the request waiting for the rest (no answer, nothing failed)."""
    url, key = target
    host, port = url.removeprefix("http://").split(":")
    body = b'{"model": "m"}'
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        sock.settimeout(2)
        try:
            answer = sock.recv(4096)
        except TimeoutError:
            answer = b""
    if expected is None:
        assert answer == b"", answer  # still waiting for the declared bytes
    else:
        assert answer.startswith(f"HTTP/1.1 {expected}".encode()), answer[:200]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.one_of(
        st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40).map(
            lambda p: "/" + p
        ),
        st.sampled_from(
            ["/v1/../admin", "/v1/%2e%2e/x", "/v1/chat/completions/", "//v1/models", "/v1/usage?days=x"]
        ),
    ),
    method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "OPTIONS"]),
)
def test_no_path_or_method_makes_the_gateway_fail(target: tuple[str, str], path: str, method: str) -> None:
    url, key = target
    try:
        reply = httpx.request(
            method, url + path, headers={"authorization": f"Bearer {key}"}, content=b"{}", timeout=10
        )
    except (httpx.InvalidURL, httpx.UnsupportedProtocol):
        return  # not a request httpx can send
    except httpx.ProtocolError:
        return  # the HTTP server refused a malformed request line
    _assert_not_the_gateways_fault(reply, (method, path))


def test_the_fuzz_upstream_answers_everything(target: tuple[str, str]) -> None:
    """The premise of the properties above: a 5xx can only come from the gateway."""
    url, key = target
    reply = httpx.post(
        url + "/v1/chat/completions", json={"model": "m"}, headers={"authorization": f"Bearer {key}"}
    )
    assert reply.status_code == 200 and reply.json()["choices"]
