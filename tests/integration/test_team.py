"""Issue #8 against real vLLM (CPU, SmolLM2) behind the gateway: a client leaving a non-streamed request
stops the generation, a stream without ``stream_options`` is still accounted in the ledger, and a key's
``max_n`` refuses ``"n": 1000`` before vLLM sees it."""

from __future__ import annotations

import http.client
import json
import urllib.parse
import uuid

import httpx
import openai
import pytest

from serve.gateway.keys import KeyPolicy
from tests.integration.conftest import (
    Decoding,
    LiveStack,
    assert_generation_stopped,
    leave_mid_generation,
    ledger_row,
    new_key,
    vllm_gauge,
    wait_decoding,
)
from tests.polling import wait_for

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_a_client_leaving_a_non_streamed_request_stops_the_generation_in_vllm(smollm2: LiveStack):
    max_tokens = 1900  # with ignore_eos: tens of seconds to decode on a CPU
    gateway = urllib.parse.urlsplit(smollm2.gateway)
    body = {
        "model": smollm2.model,
        "messages": QUESTION,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
    }
    request_ids: list[str] = []

    def attempt(tokens_before: float) -> Decoding:
        request_ids.append(f"leave-{uuid.uuid4().hex}")
        conn = http.client.HTTPConnection(gateway.hostname, gateway.port, timeout=60)
        headers = {**smollm2.headers(), "content-type": "application/json", "x-request-id": request_ids[-1]}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=headers)
        seen = wait_decoding(smollm2, tokens_before)
        conn.close()  # the client leaves before the (non-streamed) answer exists
        return seen

    # Only this test's request runs in vLLM from then on, so its counters are this request's.
    generated_before, at_leave = leave_mid_generation(smollm2, attempt, max_tokens, "a non-streamed answer")
    assert_generation_stopped(smollm2, generated_before, at_leave, max_tokens, "a non-streamed answer")
    row = ledger_row(smollm2.keys_db, request_ids[-1])
    assert (row["outcome"], row["status"], row["stream"]) == ("client_disconnect", 499, 0)


def test_a_stream_without_stream_options_shows_no_usage_chunk_but_is_in_the_ledger(smollm2: LiveStack):
    client = openai.OpenAI(base_url=smollm2.gateway + "/v1", api_key=smollm2.key, max_retries=0)
    asked = dict(model=smollm2.model, messages=QUESTION, temperature=0, extra_body={"ignore_eos": True})
    prompt_tokens = client.chat.completions.create(**asked, max_tokens=1).usage.prompt_tokens
    request_id = f"stream-{uuid.uuid4().hex}"
    chunks = list(
        client.chat.completions.create(
            **asked, max_tokens=8, stream=True, extra_headers={"x-request-id": request_id}
        )
    )
    assert chunks, "the stream was empty"
    # A usage-only chunk has empty choices (some clients crash on it); this client did not ask for one.
    assert all(chunk.choices and chunk.usage is None for chunk in chunks), chunks
    assert chunks[-1].choices[0].finish_reason == "length"
    row = ledger_row(smollm2.keys_db, request_id)
    assert (row["outcome"], row["status"], row["stream"]) == ("ok", 200, 1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt_tokens, 8)
    assert row["key_name"] == "integration" and row["model"] == smollm2.model


def test_a_key_with_max_n_refuses_n_1000_before_vllm(smollm2: LiveStack):
    # Tried as a new user would: {"n": 1000} went through to vLLM and came back with 1,000 choices.
    key = new_key(smollm2, "team-max-n", KeyPolicy(max_n=4))
    headers = {"authorization": f"Bearer {key}"}
    # vLLM's HTTP request counter (every route it serves, /metrics excluded): only what reached it.
    reached_before = vllm_gauge(smollm2, "http_requests_total")
    request_id = f"n1000-{uuid.uuid4().hex}"
    refused = httpx.post(
        smollm2.gateway + "/v1/chat/completions",
        json={"model": smollm2.model, "messages": QUESTION, "n": 1000, "max_tokens": 1},
        headers={**headers, "x-request-id": request_id},
        timeout=60,
    )
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("n_exceeded", "n")
    # Within the cap the same key's request reaches vLLM (and marks where the counter stands).
    allowed = httpx.post(
        smollm2.gateway + "/v1/chat/completions",
        # Several choices need sampling: cpu-demo answers greedily unless the request sets a temperature.
        json={"model": smollm2.model, "messages": QUESTION, "n": 2, "max_tokens": 1, "temperature": 1.0},
        headers=headers,
        timeout=60,
    )
    assert allowed.status_code == 200 and len(allowed.json()["choices"]) == 2
    # vLLM counts a request once its answer is sent, so the count may trail the reply a moment.
    wait_for(
        lambda: vllm_gauge(smollm2, "http_requests_total") >= reached_before + 1,
        15,
        "vLLM never counted the allowed request",
        0.2,
    )
    assert vllm_gauge(smollm2, "http_requests_total") == reached_before + 1, "n=1000 reached vLLM"
    row = ledger_row(smollm2.keys_db, request_id)
    assert (row["outcome"], row["status"], row["key_name"]) == ("rejected", 400, "team-max-n")
