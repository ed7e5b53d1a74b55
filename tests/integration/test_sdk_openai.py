"""The official ``openai`` SDK, unmodified (``base_url=<gateway>/v1``, ``api_key=<kit key>``), against the
gateway in front of real vLLM on the CPU: chat (streamed and not), completions, responses, tools with
``tool_choice`` auto / required / named, ``response_format`` json_schema, ``n``, ``logprobs``, ``seed``,
the SDK's error classes for the gateway's 401 and 429, and a ledger row for every one of those requests.

The model is the tiny random-weight Qwen3.6 architecture (``cpu-qwen3_5-tiny``), not SmolLM2: it is served
the way Qwen3.6-27B is, with the model's own chat template, the ``qwen3`` reasoning parser and the
``qwen3_coder`` tool-call parser. ``tool_choice: auto`` needs a tool-call parser (vLLM answers 400
without one, and the SmolLM2 profile has none), and thinking only exists with the reasoning parser.
Random weights say nothing sensible, so these tests check protocol shape, what the SDK parses, and that
the gateway passes every field through and counts every token; content is only compared between two
runs of the same greedy (or seeded) request. What a random model does on its own, and how the tests keep
it to a bounded, parseable answer:

- Its template thinks by default and the reasoning parser routes everything before ``</think>`` (which a
  random model never writes) to ``reasoning``; structured output only starts after the reasoning ends.
  Tests of content, tools and JSON therefore turn thinking off (``chat_template_kwargs``).
- ``tool_choice`` required / named make vLLM constrain the call's envelope with the ``qwen3_coder``
  structural tag; only a tool declared ``strict: true`` gets its argument schema enforced too, so the
  tools here are strict (else the random model writes a parameter name of its own and the call parses
  as ``{}``). The call ends in whitespace the grammar allows, so ``finish_reason`` is ``length``.
  Streamed, vLLM also sends the envelope's ``<tool_call>\\n`` as ``content`` (unstreamed, content is
  empty; the same through the gateway and straight from vLLM): the tests compare the calls, not that.
- JSON mode allows whitespace between tokens, and at temperature 0 the random model picks a whitespace
  token again and again until ``max_tokens``. ``presence_penalty`` makes each used token 2 logits less
  likely (the model's logits lie within a fraction of one logit), so each whitespace token of its
  1,024-token vocabulary is used at most about once and the object closes.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import openai
import pytest

from serve.gateway.keys import KeyPolicy
from tests.integration.conftest import LiveStack, ledger_row, new_key

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
# A random model may write its end-of-text token at any point: tests that count tokens generate them all.
WHOLE = {"ignore_eos": True}
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
TOOL_TOKENS = 64  # the call (~30 tokens with a value of at most 12 characters) and its trailing whitespace


def client_for(live: LiveStack, key: str | None = None) -> openai.OpenAI:
    """The SDK as an application would configure it; no retries, so a 429 or 401 surfaces at once."""
    return openai.OpenAI(base_url=live.gateway + "/v1", api_key=key or live.key, max_retries=0)


def rid(label: str) -> str:
    """A fresh ``x-request-id``: the gateway keeps the client's, so its ledger row can be found."""
    return f"sdk-openai-{label}-{uuid.uuid4().hex[:12]}"


def tagged(request_id: str) -> dict[str, Any]:
    return {"extra_headers": {"x-request-id": request_id}}


def assert_ledger(
    live: LiveStack, request_id: str, *, route: str, stream: bool, prompt: int, completion: int
) -> dict[str, Any]:
    """The request's ledger row: served ok, for the module's key, with the tokens the SDK reported.

    The SDK hangs up on ``data: [DONE]``, sometimes before vLLM's response has ended; the row still says
    ok (tests/test_gateway_sse_split.py pins that down deterministically).
    """
    row = ledger_row(live.keys_db, request_id)
    assert (row["route"], bool(row["stream"])) == (route, stream)
    assert (row["status"], row["outcome"]) == (200, "ok"), row
    assert (row["key_name"], row["model"]) == ("integration", live.model)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion), row
    return row


def streamed_tool_calls(chunks: list[Any]) -> dict[int, dict[str, str]]:
    """The tool calls of a streamed chat answer, by index: id and name from the first delta that has
    them, arguments concatenated over every delta."""
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                if delta.id and not call["id"]:
                    call["id"] = delta.id
                if delta.function and delta.function.name and not call["name"]:
                    call["name"] = delta.function.name
                if delta.function and delta.function.arguments:
                    call["arguments"] += delta.function.arguments
    return calls


def test_chat_streamed_and_not_give_the_same_greedy_answer_and_ledger_rows(qwen3_5_tiny_bare: LiveStack):
    live = qwen3_5_tiny_bare
    client = client_for(live)
    asked: dict[str, Any] = dict(
        model=live.model, messages=QUESTION, max_tokens=8, temperature=0, extra_body={**NO_THINKING, **WHOLE}
    )
    plain_id, stream_id = rid("chat"), rid("chat-stream")
    reply = client.chat.completions.create(**asked, **tagged(plain_id))
    assert reply.object == "chat.completion" and reply.model == live.model
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"  # ignore_eos: all 8 tokens
    assert reply.usage is not None and reply.usage.completion_tokens == 8

    chunks = list(
        client.chat.completions.create(
            **asked, stream=True, stream_options={"include_usage": True}, **tagged(stream_id)
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    usage_chunks = [c for c in chunks if c.usage is not None]
    # Asked for: exactly one usage chunk, the last, with no choices, as OpenAI sends it.
    assert usage_chunks == [chunks[-1]] and chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    assert_ledger(
        live,
        plain_id,
        route="/v1/chat/completions",
        stream=False,
        prompt=reply.usage.prompt_tokens,
        completion=8,
    )
    assert_ledger(
        live,
        stream_id,
        route="/v1/chat/completions",
        stream=True,
        prompt=reply.usage.prompt_tokens,
        completion=8,
    )


def test_chat_with_thinking_returns_reasoning_and_the_ledger_bills_it(qwen3_5_tiny_bare: LiveStack):
    live = qwen3_5_tiny_bare
    request_id = rid("thinking")
    reply = client_for(live).chat.completions.create(
        model=live.model,
        messages=QUESTION,
        max_tokens=8,
        temperature=0,
        extra_body=WHOLE,
        **tagged(request_id),
    )
    message = reply.choices[0].message
    # vLLM's field (the SDK keeps fields it does not know): all 8 tokens are thinking, none is content.
    assert (message.model_extra or {}).get("reasoning"), message
    assert not message.content
    assert reply.usage is not None and reply.usage.completion_tokens_details is not None
    reasoning = reply.usage.completion_tokens_details.reasoning_tokens
    assert reasoning == reply.usage.completion_tokens == 8
    row = assert_ledger(
        live,
        request_id,
        route="/v1/chat/completions",
        stream=False,
        prompt=reply.usage.prompt_tokens,
        completion=8,
    )
    assert row["reasoning_tokens"] == reasoning


def test_completions_streamed_and_not_with_logprobs(qwen3_5_tiny_bare: LiveStack):
    live = qwen3_5_tiny_bare
    client = client_for(live)
    asked: dict[str, Any] = dict(
        model=live.model, prompt="The weather in Paris is", max_tokens=6, temperature=0, extra_body=WHOLE
    )
    plain_id, stream_id = rid("completion"), rid("completion-stream")
    reply = client.completions.create(**asked, logprobs=2, **tagged(plain_id))
    assert reply.object == "text_completion"
    choice = reply.choices[0]
    assert choice.text and choice.finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 6
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        # Greedy: the chosen token is the most likely one, and (with ties) at least 2 are listed.
        assert len(top) >= 2 and chosen == pytest.approx(max(top.values()))

    chunks = list(
        client.completions.create(
            **asked, stream=True, stream_options={"include_usage": True}, **tagged(stream_id)
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6

    prompt = reply.usage.prompt_tokens
    assert_ledger(live, plain_id, route="/v1/completions", stream=False, prompt=prompt, completion=6)
    assert_ledger(live, stream_id, route="/v1/completions", stream=True, prompt=prompt, completion=6)


def test_responses_streamed_and_not(qwen3_5_tiny_bare: LiveStack):
    live = qwen3_5_tiny_bare
    client = client_for(live)
    plain_id, stream_id = rid("responses"), rid("responses-stream")
    response = client.responses.create(
        model=live.model,
        input="What is the weather in Paris?",
        max_output_tokens=16,
        temperature=0,
        reasoning={"effort": "none"},  # the Responses way to turn thinking off
        extra_body=WHOLE,
        **tagged(plain_id),
    )
    assert response.object == "response" and response.model == live.model
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert [item.type for item in response.output] == ["message"]
    assert response.output_text
    assert response.usage is not None and response.usage.output_tokens == 16

    events = list(
        client.responses.create(
            model=live.model,
            input="What is the weather in Paris?",
            max_output_tokens=16,
            temperature=0,
            reasoning={"effort": "none"},
            extra_body=WHOLE,
            stream=True,
            **tagged(stream_id),
        )
    )
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and "response.output_text.delta" in kinds
    # A response cut at max_output_tokens ends with response.incomplete (response.completed otherwise).
    assert kinds[-1] in {"response.incomplete", "response.completed"}
    final = events[-1].response
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == response.output_text
    assert final.usage is not None and final.usage.output_tokens == 16

    prompt = response.usage.input_tokens
    assert_ledger(live, plain_id, route="/v1/responses", stream=False, prompt=prompt, completion=16)
    assert_ledger(live, stream_id, route="/v1/responses", stream=True, prompt=prompt, completion=16)


def test_tool_choice_auto_reaches_the_template_and_answers_in_the_openai_shape(qwen3_5_tiny_bare: LiveStack):
    live = qwen3_5_tiny_bare
    client = client_for(live)
    asked: dict[str, Any] = dict(
        model=live.model, messages=QUESTION, max_tokens=16, temperature=0, extra_body=NO_THINKING
    )
    bare = client.chat.completions.create(**asked)
    request_id = rid("tools-auto")
    reply = client.chat.completions.create(
        **asked, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="auto", **tagged(request_id)
    )
    assert reply.usage is not None and bare.usage is not None
    # The tools were rendered into the prompt by the model's template (hundreds of tokens).
    assert reply.usage.prompt_tokens > bare.usage.prompt_tokens + 100
    choice = reply.choices[0]
    assert choice.finish_reason in {"stop", "length", "tool_calls"}
    # Auto leaves the choice to the model: a random one may or may not call; a call must parse.
    for call in choice.message.tool_calls or []:
        assert call.function.name in {"get_weather", "get_time"}
        assert isinstance(json.loads(call.function.arguments), dict)
    assert choice.message.content or choice.message.tool_calls
    chunks = list(
        client.chat.completions.create(
            **asked, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="auto", stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        choice.message.content or ""
    )
    assert_ledger(
        live,
        request_id,
        route="/v1/chat/completions",
        stream=False,
        prompt=reply.usage.prompt_tokens,
        completion=reply.usage.completion_tokens,
    )


@pytest.mark.parametrize(
    "tool_choice",
    ["required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["required", "named"],
)
def test_forced_tool_calls_parse_streamed_and_not_and_their_result_is_taken(
    qwen3_5_tiny_bare: LiveStack, tool_choice: Any
):
    live = qwen3_5_tiny_bare
    client = client_for(live)
    tools = [WEATHER_TOOL] if tool_choice == "required" else [WEATHER_TOOL, TIME_TOOL]
    asked: dict[str, Any] = dict(
        model=live.model,
        messages=QUESTION,
        max_tokens=TOOL_TOKENS,
        temperature=0,
        tools=tools,
        tool_choice=tool_choice,
        extra_body=NO_THINKING,
    )
    plain_id, stream_id = rid("tools-forced"), rid("tools-forced-stream")
    reply = client.chat.completions.create(**asked, **tagged(plain_id))
    calls = reply.choices[0].message.tool_calls
    assert calls and len(calls) == 1, reply
    call = calls[0]
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str), arguments

    chunks = list(client.chat.completions.create(**asked, stream=True, **tagged(stream_id)))
    streamed = streamed_tool_calls(chunks)
    assert list(streamed) == [0], streamed
    assert streamed[0]["id"] and streamed[0]["name"] == "get_weather"
    # Concatenated over the deltas, the arguments parse, and as the non-streamed call's.
    assert json.loads(streamed[0]["arguments"]) == arguments

    # The call's result goes back with its id; the next turn is accepted and answered.
    follow_up = client.chat.completions.create(
        model=live.model,
        messages=[
            *QUESTION,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": call.function.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "clear", "celsius": 21})},
        ],
        tools=tools,
        max_tokens=4,
        temperature=0,
        extra_body=NO_THINKING,
    )
    assert follow_up.choices[0].finish_reason in {"stop", "length", "tool_calls"}
    assert follow_up.usage is not None and follow_up.usage.prompt_tokens > reply.usage.prompt_tokens

    usage = reply.usage
    assert usage is not None
    assert_ledger(
        live,
        plain_id,
        route="/v1/chat/completions",
        stream=False,
        prompt=usage.prompt_tokens,
        completion=usage.completion_tokens,
    )
    # Streamed, the call is billed as much as unstreamed (the same greedy tokens).
    assert_ledger(
        live,
        stream_id,
        route="/v1/chat/completions",
        stream=True,
        prompt=usage.prompt_tokens,
        completion=usage.completion_tokens,
    )


def test_response_format_json_schema_gives_an_object_with_the_schema_s_keys(qwen3_5_tiny_bare: LiveStack):
    live = qwen3_5_tiny_bare
    client = client_for(live)
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
        "additionalProperties": False,
    }
    asked: dict[str, Any] = dict(
        model=live.model,
        messages=[{"role": "user", "content": "Describe the weather in Paris as JSON."}],
        max_tokens=96,
        temperature=0,
        presence_penalty=2.0,  # see the module docstring: ends the random model's whitespace runs
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "weather", "schema": schema, "strict": True},
        },
        extra_body=NO_THINKING,
    )
    request_id = rid("json-schema")
    reply = client.chat.completions.create(**asked, **tagged(request_id))
    assert reply.choices[0].finish_reason == "stop", reply
    content = reply.choices[0].message.content
    assert content is not None
    value = json.loads(content)
    assert set(value) == {"city", "sunny"}, value
    assert isinstance(value["city"], str) and isinstance(value["sunny"], bool)

    chunks = list(client.chat.completions.create(**asked, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert json.loads(streamed) == value
    assert reply.usage is not None
    assert_ledger(
        live,
        request_id,
        route="/v1/chat/completions",
        stream=False,
        prompt=reply.usage.prompt_tokens,
        completion=reply.usage.completion_tokens,
    )


def test_n_2_gives_two_choices_streamed_and_not(qwen3_5_tiny_bare: LiveStack):
    live = qwen3_5_tiny_bare
    client = client_for(live)
    # Several choices need sampling: at temperature 0 both would be the same greedy answer.
    asked: dict[str, Any] = dict(
        model=live.model,
        messages=QUESTION,
        max_tokens=4,
        temperature=1.0,
        n=2,
        extra_body={**NO_THINKING, **WHOLE},
    )
    request_id = rid("n2")
    reply = client.chat.completions.create(**asked, seed=11, **tagged(request_id))
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert all(c.message.content for c in reply.choices)
    assert reply.choices[0].message.content != reply.choices[1].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == 8  # both choices are billed

    chunks = list(
        client.chat.completions.create(**asked, stream=True, stream_options={"include_usage": True})
    )
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] and texts[1]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert_ledger(
        live,
        request_id,
        route="/v1/chat/completions",
        stream=False,
        prompt=reply.usage.prompt_tokens,
        completion=8,
    )


def test_chat_logprobs_name_the_greedy_token_and_its_alternatives(qwen3_5_tiny_bare: LiveStack):
    live = qwen3_5_tiny_bare
    reply = client_for(live).chat.completions.create(
        model=live.model,
        messages=QUESTION,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={**NO_THINKING, **WHOLE},
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert reply.usage is not None and len(entries) == reply.usage.completion_tokens == 5
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs))


def test_seed_makes_a_sampled_answer_repeatable_and_reaches_vllm_unchanged(qwen3_5_tiny_bare: LiveStack):
    live = qwen3_5_tiny_bare
    client = client_for(live)
    asked: dict[str, Any] = dict(model=live.model, messages=QUESTION, max_tokens=12, temperature=1.0)

    def sampled(seed: int) -> str:
        reply = client.chat.completions.create(**asked, seed=seed, extra_body={**NO_THINKING, **WHOLE})
        content = reply.choices[0].message.content
        assert content
        return content

    first, again, other = sampled(7), sampled(7), sampled(8)
    assert first == again
    assert first != other, "two seeds sampled the same 12 tokens: the seed did not reach the sampler"
    with live.vllm_client(timeout=60) as vllm:
        direct = vllm.post(
            live.vllm + "/v1/chat/completions", json={**asked, **NO_THINKING, **WHOLE, "seed": 7}
        )
    assert direct.status_code == 200, direct.text
    assert direct.json()["choices"][0]["message"]["content"] == first


def test_a_bad_key_is_an_authentication_error_and_a_ledger_row(qwen3_5_tiny_bare: LiveStack):
    live = qwen3_5_tiny_bare
    request_id = rid("bad-key")
    bad = client_for(live, key="sk-kit-00000000_not-a-key")
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.chat.completions.create(model=live.model, messages=QUESTION, max_tokens=4, **tagged(request_id))
    error = caught.value
    assert error.status_code == 401
    assert error.code == "invalid_api_key" and error.type == "invalid_request_error"
    assert error.response.headers["x-request-id"] == request_id
    row = ledger_row(live.keys_db, request_id)
    assert (row["status"], row["outcome"], row["key_name"]) == (401, "rejected", None)


def test_a_key_over_its_rpm_gets_a_rate_limit_error_and_usage_shows_it(qwen3_5_tiny_bare: LiveStack):
    live = qwen3_5_tiny_bare
    name = f"sdk-rpm-{uuid.uuid4().hex[:6]}"
    key = new_key(live, name, KeyPolicy(rpm=1))
    client = client_for(live, key)
    served: list[tuple[str, int]] = []
    refused: openai.RateLimitError | None = None
    refused_id = ""
    # rpm counts fixed UTC minutes: if the minute turns between two requests the second is served too,
    # but a third within seconds cannot be.
    for attempt in range(3):
        request_id = rid(f"rpm-{attempt}")
        try:
            reply = client.chat.completions.create(
                model=live.model,
                messages=QUESTION,
                max_tokens=2,
                extra_body={**NO_THINKING, **WHOLE},
                **tagged(request_id),
            )
        except openai.RateLimitError as error:
            refused, refused_id = error, request_id
            break
        assert reply.usage is not None
        served.append((request_id, reply.usage.prompt_tokens))
    assert refused is not None, "a key with rpm=1 was served 3 requests in a row"
    assert served, "a key with rpm=1 was refused its first request"
    assert refused.status_code == 429 and refused.code == "rate_limit_exceeded"
    assert int(refused.response.headers["retry-after"]) >= 1
    assert refused.response.headers["x-ratelimit-limit"] == "rpm=1"

    for request_id, prompt in served:
        row = ledger_row(live.keys_db, request_id)
        assert (row["status"], row["outcome"], row["key_name"]) == (200, "ok", name)
        assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, 2)
    row = ledger_row(live.keys_db, refused_id)
    assert (row["status"], row["outcome"], row["key_name"], row["completion_tokens"]) == (
        429,
        "rejected",
        name,
        0,
    )
    # The key's own usage report (every row above is in the ledger by now) counts the same: the served
    # requests with their tokens, the refusal apart (the /v1/models calls are rows with no model).
    usage = httpx.get(live.gateway + "/v1/usage", headers={"authorization": f"Bearer {key}"}, timeout=30)
    assert usage.status_code == 200, usage.text
    rows = [r for r in usage.json()["data"] if r["model"] == live.model]
    assert rows and {r["key"] for r in rows} == {name}
    assert sum(r["requests"] for r in rows) == len(served)
    assert sum(r["refused"] for r in rows) == 1
    assert sum(r["prompt_tokens"] for r in rows) == sum(prompt for _, prompt in served)
    assert sum(r["completion_tokens"] for r in rows) == 2 * len(served)


def test_a_keys_thinking_budget_ends_the_reasoning_and_the_answer_still_comes(qwen3_5_tiny_bare: LiveStack):
    """vLLM 0.32's thinking_token_budget, set by the gateway from the key: without it the random model
    thinks for longer than the budget (greedy: 32 of its 48 tokens); with a budget of 8 vLLM forces the
    end of the reasoning and the rest of the tokens are the answer. The thinking-off key is the cheap case."""
    live = qwen3_5_tiny_bare
    costs: dict[str, tuple[int, int, int]] = {}
    for label, policy in (
        ("thinking on", KeyPolicy()),
        ("budget 8", KeyPolicy(thinking_budget=8)),
        ("thinking off", KeyPolicy(enable_thinking=False)),
    ):
        request_id = rid(label.replace(" ", "-"))
        reply = client_for(
            live, new_key(live, f"sdk-{uuid.uuid4().hex[:6]}", policy)
        ).chat.completions.create(
            model=live.model,
            messages=QUESTION,
            max_tokens=48,
            temperature=0,
            extra_body=WHOLE,
            **tagged(request_id),
        )
        assert reply.usage is not None and reply.usage.completion_tokens_details is not None
        reasoning = reply.usage.completion_tokens_details.reasoning_tokens or 0
        costs[label] = (reply.usage.prompt_tokens, reply.usage.completion_tokens, reasoning)
        row = ledger_row(live.keys_db, request_id)
        assert row["reasoning_tokens"] == reasoning, row
        content = reply.choices[0].message.content
        if label == "thinking on":
            assert reasoning > 12, reasoning
        elif label == "budget 8":
            # At most the budget (and the forced end marker); everything after it is answer.
            assert 0 < reasoning <= 12 and content, (reasoning, content)
        else:
            assert reasoning == 0 and content
    print("tokens (prompt, completion, reasoning):", costs)  # the README's thinking-cost table
