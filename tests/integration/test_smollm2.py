"""SmolLM2-135M-Instruct (real weights) on real vLLM (CPU) behind the real gateway."""

from __future__ import annotations

import json
import os
import stat

import httpx
import openai
import pytest

from tests.integration.conftest import (
    Decoding,
    assert_generation_stopped,
    leave_mid_generation,
    listening_sockets,
    wait_decoding,
)

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_answers_a_factual_question_through_the_gateway(smollm2):
    client = openai.OpenAI(base_url=smollm2.gateway + "/v1", api_key=smollm2.key, max_retries=0)
    reply = client.chat.completions.create(
        model=smollm2.model, messages=QUESTION, temperature=0, max_tokens=32
    )
    assert "paris" in reply.choices[0].message.content.lower()
    assert reply.usage.completion_tokens > 0


def test_streams_a_factual_answer_through_the_gateway(smollm2):
    client = openai.OpenAI(base_url=smollm2.gateway + "/v1", api_key=smollm2.key, max_retries=0)
    pieces = []
    stream = client.chat.completions.create(
        model=smollm2.model,
        messages=QUESTION,
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = 0
    for chunk in stream:
        chunks += 1
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert chunks > 3, "the answer should arrive as several events"
    assert "paris" in "".join(pieces).lower()
    metrics = httpx.get(smollm2.gateway + "/metrics").text
    # The client did not ask for usage; the gateway asked vLLM for it, so the stream is counted.
    counter = f'kit_gateway_tokens_total{{key="integration",model="{smollm2.model}",type="completion"}}'
    assert counter in metrics


def test_models_and_completions_pass_through(smollm2):
    client = openai.OpenAI(base_url=smollm2.gateway + "/v1", api_key=smollm2.key, max_retries=0)
    assert [m.id for m in client.models.list()] == [smollm2.model]
    reply = client.completions.create(
        model=smollm2.model, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert reply.choices[0].text.strip()


def test_a_client_disconnect_cancels_the_request_in_vllm(smollm2):
    max_tokens = 1900  # with ignore_eos: tens of seconds to decode on a CPU
    body = {
        "model": smollm2.model,
        "messages": QUESTION,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
    }

    def attempt(tokens_before: float) -> Decoding:
        with httpx.stream(
            "POST", smollm2.gateway + "/v1/chat/completions", json=body, headers=smollm2.headers(), timeout=60
        ) as reply:
            assert reply.status_code == 200
            chunks = reply.iter_raw()
            next(chunks)
            return wait_decoding(smollm2, tokens_before, meanwhile=lambda: next(chunks))

    # Only this test's request runs in vLLM from then on, so its counters are this request's.
    tokens_before, at_leave = leave_mid_generation(smollm2, attempt, max_tokens, "a stream")
    # The client has left: vLLM stops decoding before max_tokens.
    assert_generation_stopped(smollm2, tokens_before, at_leave, max_tokens, "a stream")


# (method, path, does this vLLM serve it directly?). /v1/load_lora_adapter exists only with
# VLLM_ALLOW_RUNTIME_LORA_UPDATING, which the profiles never set; the gateway must block it regardless.
OPEN_ROUTES = [
    ("POST", "/invocations", True),
    ("POST", "/pause", False),  # dev-mode only in this vLLM
    ("POST", "/tokenize", True),
    ("GET", "/ping", True),
    ("POST", "/v1/load_lora_adapter", False),
]


@pytest.mark.parametrize(("method", "path", "served_by_vllm"), OPEN_ROUTES)
def test_routes_vllm_leaves_open_are_404_at_the_gateway(smollm2, method, path, served_by_vllm):
    if served_by_vllm:
        with smollm2.vllm_client() as vllm:
            direct = vllm.request(method, smollm2.vllm + path, json={"model": smollm2.model, "prompt": "x"})
        assert direct.status_code != 404, f"vLLM itself serves {path} unauthenticated (that is the risk)"
    reply = httpx.request(method, smollm2.gateway + path, json={}, headers=smollm2.headers())
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "not_found"


def test_vllm_serves_http_only_on_its_socket_in_a_private_folder(smollm2):
    """What the socket is for: other local users cannot reach vLLM's unguarded routes over TCP."""
    uds = smollm2.stack.vllm_uds
    assert uds is not None and uds.is_socket()
    folder = uds.parent.stat()
    assert stat.S_IMODE(folder.st_mode) == 0o700 and folder.st_uid == os.getuid()
    server = smollm2.stack.vllm.process.pid  # vLLM's HTTP server runs in the process the stack started
    listeners = listening_sockets(server)  # its process group: the server, engine core and CPU worker
    assert str(uds) in {s.address for s in listeners if s.pid == server and s.kind == "unix"}
    tcp = [s for s in listeners if s.kind == "tcp"]
    assert not [s for s in tcp if s.pid == server], f"vLLM's HTTP server listens on TCP: {tcp}"
    # The only TCP listeners left are torch.distributed's (gloo store and pairs) in the CPU worker,
    # on loopback; they do not speak HTTP.
    assert all(s.comm.startswith("VLLM::Worker") and s.address.startswith("127.0.0.1:") for s in tcp), tcp


def test_bad_key_is_401_and_big_body_is_413(smollm2):
    client = openai.OpenAI(base_url=smollm2.gateway + "/v1", api_key="sk-kit-deadbeef_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    big = {"model": smollm2.model, "messages": [{"role": "user", "content": "x" * (9 * 1024 * 1024)}]}
    reply = httpx.post(
        smollm2.gateway + "/v1/chat/completions", json=big, headers=smollm2.headers(), timeout=30
    )
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "request_too_large"


def test_vllm_error_bodies_reach_the_client_unchanged(smollm2):
    body = {"model": "no-such-model", "messages": QUESTION}
    with smollm2.vllm_client() as vllm:
        direct = vllm.post(smollm2.vllm + "/v1/chat/completions", json=body)
    through = httpx.post(
        smollm2.gateway + "/v1/chat/completions", json=body, headers=smollm2.headers(), timeout=30
    )
    assert through.status_code == direct.status_code == 404
    assert json.loads(through.content) == json.loads(direct.content)


@pytest.mark.stops_stack
def test_upstream_stopped_gives_503_with_retry_after(smollm2):
    """Runs after every other test that uses the smollm2 stack (conftest): it stops that vLLM."""
    smollm2.stack.vllm.stop()
    reply = httpx.post(
        smollm2.gateway + "/v1/chat/completions",
        headers=smollm2.headers(),
        json={"model": smollm2.model, "messages": QUESTION},
    )
    assert reply.status_code == 503
    assert int(reply.headers["retry-after"]) > 0
    assert reply.json()["error"]["code"] == "upstream_unavailable"
    assert httpx.get(smollm2.gateway + "/readyz").status_code == 503
