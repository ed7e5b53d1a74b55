"""The official ``anthropic`` SDK, unmodified (``base_url=<gateway>``, ``api_key=<kit key>``), against the
gateway's ``/v1/messages`` in front of real vLLM on the CPU (vLLM serves the Messages API itself): messages
created and streamed, thinking blocks, tools (``any``, a named tool, ``auto``, and a ``tool_result``
turn), ``count_tokens``, the SDK's error classes and types for the gateway's 401 (``authentication_error``)
and 429 (``rate_limit_error``), and a ledger row with the SDK's token counts for each request.

The model is the tiny random-weight Qwen3.6 architecture (``cpu-qwen3_5-tiny``): it is served as
Qwen3.6-27B is, with the ``qwen3`` reasoning parser (which is what turns the model's thinking into
Anthropic ``thinking`` blocks; SmolLM2's profile has none) and the ``qwen3_coder`` tool-call parser. Its
template thinks unless told not to, and a random model never closes ``</think>``, so a request without
``thinking`` answers with a thinking block only; ``thinking: {"type": "disabled"}`` turns it off (vLLM maps
it to ``reasoning_effort: none``). Forced tool calls use strict tools, so vLLM constrains the arguments
too (see tests/integration/test_sdk_openai.py). Random weights say nothing sensible: these tests check
protocol shape and accounting, and compare content only between runs of the same greedy request.

Not tested here: ``thinking: {"type": "enabled", "budget_tokens": N}``. vLLM 0.32 refuses a budget under
1,024 tokens or not under ``max_tokens`` (a 400 passed through unchanged), so a test would generate over a
thousand tokens on the CPU; thinking budgets are issue #9 section 2's work. The SDK 2.14 has no
``temperature`` argument any more: it goes in ``extra_body`` (vLLM's Messages API takes it).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import anthropic
import pytest

from serve.gateway.keys import KeyPolicy
from tests.integration.conftest import LiveStack, ledger_row, new_key

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
NO_THINKING: dict[str, Any] = {"type": "disabled"}
GREEDY = {"temperature": 0}
WEATHER_TOOL: dict[str, Any] = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
TIME_TOOL: dict[str, Any] = {**WEATHER_TOOL, "name": "get_time", "description": "The local time in a city."}
TOOL_TOKENS = 64  # the call (~30 tokens with a value of at most 12 characters) and its trailing whitespace


def client_for(live: LiveStack, key: str | None = None) -> anthropic.Anthropic:
    """The SDK as an application configures it (the key goes in ``x-api-key``); no retries, so a 429 or
    401 surfaces at once."""
    return anthropic.Anthropic(base_url=live.gateway, api_key=key or live.key, max_retries=0)


def rid(label: str) -> str:
    """A fresh ``x-request-id``: the gateway keeps the client's, so its ledger row can be found."""
    return f"sdk-anthropic-{label}-{uuid.uuid4().hex[:12]}"


def tagged(request_id: str, **body: Any) -> dict[str, Any]:
    return {"extra_headers": {"x-request-id": request_id}, "extra_body": {**GREEDY, **body}}


def assert_ledger(live: LiveStack, request_id: str, *, stream: bool, usage: anthropic.types.Usage):
    """The request's ledger row: served ok on /v1/messages for the module's key, with the SDK's tokens."""
    row = ledger_row(live.keys_db, request_id)
    assert (row["route"], row["status"], row["outcome"], bool(row["stream"])) == (
        "/v1/messages",
        200,
        "ok",
        stream,
    )
    assert (row["key_name"], row["model"]) == ("integration", live.model)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (usage.input_tokens, usage.output_tokens), row
    return row


def test_messages_created_and_streamed_agree_and_are_in_the_ledger(qwen3_5_tiny_bare: LiveStack):
    live = qwen3_5_tiny_bare
    client = client_for(live)
    plain_id, stream_id = rid("create"), rid("stream")
    asked: dict[str, Any] = dict(model=live.model, max_tokens=12, messages=QUESTION, thinking=NO_THINKING)
    message = client.messages.create(**asked, **tagged(plain_id))
    assert (message.type, message.role, message.model) == ("message", "assistant", live.model)
    assert [block.type for block in message.content] == ["text"]  # thinking is off: no thinking block
    assert message.stop_reason in {"max_tokens", "end_turn"}
    assert 0 < message.usage.output_tokens <= 12 and message.usage.input_tokens > 0

    with client.messages.stream(**asked, **tagged(stream_id)) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert {"content_block_start", "content_block_delta", "content_block_stop", "message_delta"} <= set(
        events
    )
    assert [block.type for block in final.content] == ["text"]
    assert final.content[0].text == message.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason == message.stop_reason
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        message.usage.input_tokens,
        message.usage.output_tokens,
    )
    assert_ledger(live, plain_id, stream=False, usage=message.usage)
    assert_ledger(live, stream_id, stream=True, usage=final.usage)


def test_thinking_arrives_as_thinking_blocks_streamed_and_not_and_is_billed(qwen3_5_tiny_bare: LiveStack):
    live = qwen3_5_tiny_bare
    client = client_for(live)
    plain_id, stream_id = rid("thinking"), rid("thinking-stream")
    asked: dict[str, Any] = dict(model=live.model, max_tokens=12, messages=QUESTION)
    message = client.messages.create(**asked, **tagged(plain_id))
    kinds = [block.type for block in message.content]
    assert kinds and kinds[0] == "thinking", message.content
    block = message.content[0]
    assert block.type == "thinking" and block.thinking and block.signature

    with client.messages.stream(**asked, **tagged(stream_id)) as stream:
        events = list(stream)
        final = stream.get_final_message()
    # The SDK's own events for a thinking block: its deltas and, closing it, a signature.
    thinking = "".join(e.thinking for e in events if e.type == "thinking")
    assert thinking and any(e.type == "signature" for e in events)
    assert final.content[0].type == "thinking" and final.content[0].thinking == thinking
    assert thinking == block.thinking  # the same greedy answer, streamed and not

    # The Messages API reports no reasoning count: the gateway counts the thinking text with the served
    # tokenizer, so the ledger bills it apart.
    for request_id, usage, stream_flag in ((plain_id, message.usage, False), (stream_id, final.usage, True)):
        row = assert_ledger(live, request_id, stream=stream_flag, usage=usage)
        assert row["reasoning_tokens"] > 0, row


def _tool_use(message: anthropic.types.Message) -> anthropic.types.ToolUseBlock:
    calls = [block for block in message.content if block.type == "tool_use"]
    assert len(calls) == 1, message.content
    return calls[0]


@pytest.mark.parametrize(
    "tool_choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}], ids=["any", "named"]
)
def test_forced_tool_use_streamed_and_not_and_the_tool_result_turn(
    qwen3_5_tiny_bare: LiveStack, tool_choice: dict[str, Any]
):
    live = qwen3_5_tiny_bare
    client = client_for(live)
    tools = [WEATHER_TOOL] if tool_choice["type"] == "any" else [WEATHER_TOOL, TIME_TOOL]
    asked: dict[str, Any] = dict(
        model=live.model,
        max_tokens=TOOL_TOKENS,
        messages=QUESTION,
        tools=tools,
        tool_choice=tool_choice,
        thinking=NO_THINKING,
    )
    plain_id, stream_id = rid("tool"), rid("tool-stream")
    message = client.messages.create(**asked, **tagged(plain_id))
    call = _tool_use(message)
    assert call.name == "get_weather" and call.id
    assert isinstance(call.input, dict) and set(call.input) == {"city"}, call.input

    with client.messages.stream(**asked, **tagged(stream_id)) as stream:
        events = list(stream)
        final = stream.get_final_message()
    # The SDK parses the streamed input_json_delta pieces into the block's input: the same as unstreamed.
    partial = "".join(e.partial_json for e in events if e.type == "input_json")
    assert json.loads(partial) == call.input
    streamed = _tool_use(final)
    assert (streamed.name, streamed.input) == (call.name, call.input)

    follow_up = client.messages.create(
        model=live.model,
        max_tokens=4,
        tools=tools,
        thinking=NO_THINKING,
        messages=[
            *QUESTION,
            {"role": "assistant", "content": [call.model_dump(include={"type", "id", "name", "input"})]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "clear, 21 C"}],
            },
        ],
        extra_body=GREEDY,
    )
    assert follow_up.type == "message" and follow_up.content
    assert follow_up.usage.input_tokens > message.usage.input_tokens

    assert_ledger(live, plain_id, stream=False, usage=message.usage)
    assert_ledger(live, stream_id, stream=True, usage=final.usage)


def test_tool_choice_auto_reaches_the_template(qwen3_5_tiny_bare: LiveStack):
    live = qwen3_5_tiny_bare
    client = client_for(live)
    asked: dict[str, Any] = dict(model=live.model, max_tokens=8, messages=QUESTION, thinking=NO_THINKING)
    bare = client.messages.create(**asked, extra_body=GREEDY)
    request_id = rid("tool-auto")
    message = client.messages.create(
        **asked, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice={"type": "auto"}, **tagged(request_id)
    )
    # The tools were rendered into the prompt by the model's template (hundreds of tokens).
    assert message.usage.input_tokens > bare.usage.input_tokens + 100
    assert message.content and {block.type for block in message.content} <= {"text", "tool_use"}
    for block in message.content:
        if block.type == "tool_use":
            assert block.name in {"get_weather", "get_time"} and isinstance(block.input, dict)
    assert_ledger(live, request_id, stream=False, usage=message.usage)


def test_count_tokens_matches_what_a_message_is_billed_for_input(qwen3_5_tiny_bare: LiveStack):
    live = qwen3_5_tiny_bare
    client = client_for(live)
    for tools in ([], [WEATHER_TOOL]):
        request_id = rid("count")
        extra = {"tools": tools} if tools else {}
        counted = client.messages.count_tokens(
            model=live.model,
            messages=QUESTION,
            thinking=NO_THINKING,
            extra_headers={"x-request-id": request_id},
            **extra,
        )
        billed = client.messages.create(
            model=live.model,
            max_tokens=1,
            messages=QUESTION,
            thinking=NO_THINKING,
            extra_body=GREEDY,
            **extra,
        )
        assert counted.input_tokens == billed.usage.input_tokens > 0
        row = ledger_row(live.keys_db, request_id)
        assert (row["route"], row["status"], row["outcome"], row["key_name"]) == (
            "/v1/messages/count_tokens",
            200,
            "ok",
            "integration",
        )
        assert row["completion_tokens"] == 0  # counting generates nothing


@pytest.mark.parametrize("how", ["api_key", "auth_token"])
def test_a_bad_key_is_an_authentication_error(qwen3_5_tiny_bare: LiveStack, how: str):
    """Both ways the SDK sends a key (``x-api-key``, or ``Authorization: Bearer`` for ``auth_token``)."""
    live = qwen3_5_tiny_bare
    request_id = rid("bad-key")
    bad = anthropic.Anthropic(base_url=live.gateway, max_retries=0, **{how: "sk-kit-00000000_not-a-key"})
    with pytest.raises(anthropic.AuthenticationError) as caught:
        bad.messages.create(
            model=live.model, max_tokens=4, messages=QUESTION, extra_headers={"x-request-id": request_id}
        )
    error = caught.value
    assert error.status_code == 401 and error.type == "authentication_error"
    assert isinstance(error.body, dict) and error.body["type"] == "error"
    row = ledger_row(live.keys_db, request_id)
    assert (row["route"], row["status"], row["outcome"], row["key_name"]) == (
        "/v1/messages",
        401,
        "rejected",
        None,
    )
    good = anthropic.Anthropic(base_url=live.gateway, max_retries=0, **{how: live.key})
    assert good.messages.create(model=live.model, max_tokens=1, messages=QUESTION).usage.output_tokens == 1


def test_a_key_over_its_rpm_gets_a_rate_limit_error(qwen3_5_tiny_bare: LiveStack):
    live = qwen3_5_tiny_bare
    name = f"sdk-anthropic-rpm-{uuid.uuid4().hex[:6]}"
    key = new_key(live, name, KeyPolicy(rpm=1))
    client = client_for(live, key)
    served: list[tuple[str, anthropic.types.Usage]] = []
    refused: anthropic.RateLimitError | None = None
    refused_id = ""
    # rpm counts fixed UTC minutes: if the minute turns between two requests the second is served too,
    # but a third within seconds cannot be.
    for attempt in range(3):
        request_id = rid(f"rpm-{attempt}")
        try:
            message = client.messages.create(
                model=live.model, max_tokens=2, messages=QUESTION, **tagged(request_id)
            )
        except anthropic.RateLimitError as error:
            refused, refused_id = error, request_id
            break
        served.append((request_id, message.usage))
    assert refused is not None, "a key with rpm=1 was served 3 requests in a row"
    assert served, "a key with rpm=1 was refused its first request"
    assert refused.status_code == 429 and refused.type == "rate_limit_error"
    assert int(refused.response.headers["retry-after"]) >= 1
    assert "rpm" in (refused.api_message or "")

    for request_id, usage in served:
        row = ledger_row(live.keys_db, request_id)
        assert (row["status"], row["outcome"], row["key_name"]) == (200, "ok", name)
        assert (row["prompt_tokens"], row["completion_tokens"]) == (usage.input_tokens, usage.output_tokens)
    row = ledger_row(live.keys_db, refused_id)
    assert (row["route"], row["status"], row["outcome"], row["key_name"]) == (
        "/v1/messages",
        429,
        "rejected",
        name,
    )
    # Counting tokens generates nothing, so a key at its request limit may still count.
    assert client.messages.count_tokens(model=live.model, messages=QUESTION).input_tokens > 0
