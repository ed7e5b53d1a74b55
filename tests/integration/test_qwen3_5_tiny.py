"""The tiny random-weight Qwen3.6 architecture on real vLLM (CPU) behind the gateway: OpenAI chat,
Anthropic messages and Responses, streamed and not. Random weights say nothing sensible, so these
tests check protocol shape, not content."""

from __future__ import annotations

import shutil
import time

import anthropic
import httpx
import openai
import pytest

from serve.gateway.keys import KeyPolicy, KeyStore

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Say hello."}]


def test_chat_completions_with_and_without_thinking(qwen3_5_tiny):
    client = openai.OpenAI(base_url=qwen3_5_tiny.gateway + "/v1", api_key=qwen3_5_tiny.key, max_retries=0)
    for thinking in (True, False):
        reply = client.chat.completions.create(
            model=qwen3_5_tiny.model,
            messages=MESSAGES,
            max_tokens=8,
            temperature=0,
            extra_body={"chat_template_kwargs": {"enable_thinking": thinking}},
        )
        assert reply.choices[0].finish_reason in {"length", "stop"}
        assert reply.usage.completion_tokens > 0


def test_chat_stream(qwen3_5_tiny):
    client = openai.OpenAI(base_url=qwen3_5_tiny.gateway + "/v1", api_key=qwen3_5_tiny.key, max_retries=0)
    stream = client.chat.completions.create(
        model=qwen3_5_tiny.model, messages=MESSAGES, max_tokens=8, temperature=0, stream=True
    )
    finishes = [c.choices[0].finish_reason for c in stream if c.choices]
    assert finishes[-1] in {"length", "stop"}
    assert len(finishes) > 2


def test_anthropic_messages_and_stream_and_count_tokens(qwen3_5_tiny):
    client = anthropic.Anthropic(base_url=qwen3_5_tiny.gateway, api_key=qwen3_5_tiny.key, max_retries=0)
    message = client.messages.create(model=qwen3_5_tiny.model, max_tokens=8, messages=MESSAGES)
    assert message.role == "assistant" and message.usage.output_tokens > 0
    with client.messages.stream(model=qwen3_5_tiny.model, max_tokens=8, messages=MESSAGES) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert events[0] == "message_start" and "message_stop" in events
    assert final.usage.output_tokens > 0
    counted = client.messages.count_tokens(model=qwen3_5_tiny.model, messages=MESSAGES)
    assert counted.input_tokens > 0
    metrics = httpx.get(qwen3_5_tiny.gateway + "/metrics").text
    counter = f'kit_gateway_tokens_total{{key="integration",model="{qwen3_5_tiny.model}",type="prompt"}}'
    assert counter in metrics


def test_anthropic_client_with_x_api_key_and_bad_key(qwen3_5_tiny):
    bad = anthropic.Anthropic(base_url=qwen3_5_tiny.gateway, api_key="sk-kit-00000000_bad", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model=qwen3_5_tiny.model, max_tokens=4, messages=MESSAGES)


def test_responses_api(qwen3_5_tiny):
    client = openai.OpenAI(base_url=qwen3_5_tiny.gateway + "/v1", api_key=qwen3_5_tiny.key, max_retries=0)
    response = client.responses.create(model=qwen3_5_tiny.model, input="Say hello.", max_output_tokens=16)
    assert response.status in {"completed", "incomplete"}
    assert response.usage.output_tokens > 0


def _logprobs(stack, model: str) -> list[float]:
    reply = httpx.post(
        stack.gateway + "/v1/completions",
        headers=stack.headers(),
        timeout=60,
        json={
            "model": model,
            "prompt": "The weather today is",
            "max_tokens": 8,
            "temperature": 0,
            "logprobs": 1,
        },
    )
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["logprobs"]["token_logprobs"]


def test_a_lora_on_the_real_layout_changes_the_output_and_the_causal_lm_prefix_does_not(qwen3_5_tiny):
    listed = {
        m["id"]
        for m in httpx.get(qwen3_5_tiny.gateway + "/v1/models", headers=qwen3_5_tiny.headers()).json()["data"]
    }
    assert {"tiny-lora", "tiny-lora-causal-lm-keys", qwen3_5_tiny.model} <= listed
    base = _logprobs(qwen3_5_tiny, qwen3_5_tiny.model)
    tuned = _logprobs(qwen3_5_tiny, "tiny-lora")
    assert tuned != base, "the adapter trained through the served class must change the output"
    # The trap check-adapter exists for: vLLM accepts these keys and silently applies nothing.
    assert _logprobs(qwen3_5_tiny, "tiny-lora-causal-lm-keys") == base


def test_an_admin_loads_and_unloads_an_adapter_at_runtime_and_it_serves(qwen3_5_tiny):
    """POST /v1/adapters/load on real vLLM (VLLM_ALLOW_RUNTIME_LORA_UPDATING, set because the profile
    names an adapters_dir): the loaded adapter serves exactly what the same weights served from startup,
    and after unloading it is gone from /v1/models and refused by name."""
    assert qwen3_5_tiny.adapters_dir is not None
    shutil.copytree(qwen3_5_tiny.adapters_dir / "tiny-lora", qwen3_5_tiny.adapters_dir / "tiny-lora-runtime")
    admin = {
        "authorization": "Bearer " + KeyStore(qwen3_5_tiny.keys_db).create("admin", KeyPolicy(admin=True))
    }
    gateway = qwen3_5_tiny.gateway

    def listed() -> set[str]:
        reply = httpx.get(gateway + "/v1/models", headers=qwen3_5_tiny.headers())
        return {m["id"] for m in reply.json()["data"]}

    not_admin = httpx.post(
        gateway + "/v1/adapters/load", headers=qwen3_5_tiny.headers(), json={"name": "tiny-lora-runtime"}
    )
    assert not_admin.status_code == 403, not_admin.text
    # A key created while the gateway runs is seen at its next key reload (key_cache_ttl_s, 2 s).
    deadline = time.monotonic() + 10
    while (
        escape := httpx.post(gateway + "/v1/adapters/load", headers=admin, json={"name": "../tiny-lora"})
    ).status_code == 401 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert escape.status_code == 400, escape.text
    assert "tiny-lora-runtime" not in listed()

    loaded = httpx.post(
        gateway + "/v1/adapters/load", headers=admin, json={"name": "tiny-lora-runtime"}, timeout=120
    )
    assert loaded.status_code == 200, loaded.text
    assert "tiny-lora-runtime" in listed()
    rounded = [round(x, 3) for x in _logprobs(qwen3_5_tiny, "tiny-lora-runtime")]
    assert rounded == [round(x, 3) for x in _logprobs(qwen3_5_tiny, "tiny-lora")]

    unloaded = httpx.post(
        gateway + "/v1/adapters/unload", headers=admin, json={"name": "tiny-lora-runtime"}, timeout=60
    )
    assert unloaded.status_code == 200, unloaded.text
    assert "tiny-lora-runtime" not in listed()
    gone = httpx.post(
        gateway + "/v1/completions",
        headers=qwen3_5_tiny.headers(),
        json={"model": "tiny-lora-runtime", "prompt": "Hi", "max_tokens": 2},
    )
    assert gone.status_code in {400, 404}, gone.text
