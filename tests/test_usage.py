"""Token usage is read from OpenAI, Responses and Anthropic bodies and streams, split anywhere."""

from __future__ import annotations

import json

import pytest

from serve.gateway.usage import UsageChunkFilter, UsageCounter


def _sse(events: list[dict], named: bool = False) -> bytes:
    out = b""
    for event in events:
        if named:
            out += f"event: {event['type']}\n".encode()
        out += b"data: " + json.dumps(event).encode() + b"\n\n"
    return out


def _feed_in_pieces(stream: bytes, size: int) -> UsageCounter:
    counter = UsageCounter()
    for i in range(0, len(stream), size):
        counter.feed_sse(stream[i : i + size])
    return counter


def test_openai_stream_usage_survives_any_chunking():
    stream = (
        _sse(
            [
                {"choices": [{"delta": {"content": "hi"}}]},
                {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 4}},
            ]
        )
        + b"data: [DONE]\n\n"
    )
    for size in (1, 3, 7, 64, len(stream)):
        counter = _feed_in_pieces(stream, size)
        assert (counter.prompt, counter.completion) == (11, 4), size


def test_anthropic_stream_takes_input_from_start_and_running_output():
    stream = _sse(
        [
            {"type": "message_start", "message": {"usage": {"input_tokens": 9, "output_tokens": 1}}},
            {"type": "content_block_delta", "delta": {"text": "x"}},
            {"type": "message_delta", "usage": {"output_tokens": 5}},
            {"type": "message_stop"},
        ],
        named=True,
    )
    counter = _feed_in_pieces(stream, 5)
    assert (counter.prompt, counter.completion) == (9, 5)


def test_responses_api_stream_and_plain_bodies():
    stream = _sse(
        [{"type": "response.completed", "response": {"usage": {"input_tokens": 3, "output_tokens": 8}}}],
        named=True,
    )
    counter = _feed_in_pieces(stream, 10)
    assert (counter.prompt, counter.completion) == (3, 8)
    body = UsageCounter()
    body.feed_body(b'{"usage": {"prompt_tokens": 2, "completion_tokens": 6}}')
    assert (body.prompt, body.completion) == (2, 6)


def test_bodies_without_usage_or_json_count_nothing():
    counter = UsageCounter()
    counter.feed_body(b"not json")
    counter.feed_body(b'{"usage": "weird"}')
    counter.feed_sse(b"data: {broken usage\n\n")
    assert (counter.prompt, counter.completion) == (0, 0)


def _whole_parse(body: bytes) -> UsageCounter:
    """What ``feed_body`` gives when it decodes the whole body (thinking collection forces that path)."""
    counter = UsageCounter(collect_thinking=True)
    counter.feed_body(body)
    return counter


def test_body_usage_read_from_the_tail_matches_a_whole_parse():
    tricky = 'he wrote {"usage": {"prompt_tokens": 999}, "finish_reason": "length"} here'
    bodies = [
        {  # chat completion: a JSON string in the content holds the markers, escaped
            "id": "c1",
            "choices": [{"index": 0, "message": {"content": tricky}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": 12,
                "completion_tokens": 30,
                "prompt_tokens_details": {"cached_tokens": 8},
                "completion_tokens_details": {"reasoning_tokens": 20},
            },
        },
        {  # n=2: the ledger keeps the first choice's reason
            "choices": [{"index": 0, "finish_reason": "length"}, {"index": 1, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 9},
        },
        {  # Anthropic message
            "type": "message",
            "content": [{"type": "text", "text": tricky}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 5, "output_tokens": 7, "cache_read_input_tokens": 2},
        },
        {  # Responses API: no finish reason, a status (decoded whole)
            "object": "response",
            "status": "completed",
            "output": [{"content": [{"text": tricky}]}],
            "usage": {
                "input_tokens": 4,
                "output_tokens": 6,
                "output_tokens_details": {"reasoning_tokens": 1},
            },
        },
    ]
    for obj in bodies:
        for body in (json.dumps(obj).encode(), json.dumps(obj, separators=(",", ":")).encode()):
            fast = UsageCounter()
            fast.feed_body(body)
            whole = _whole_parse(body)
            got = (fast.prompt, fast.completion, fast.reasoning, fast.cached, fast.finish_reason)
            assert got == (whole.prompt, whole.completion, whole.reasoning, whole.cached, whole.finish_reason)
            assert fast.prompt not in (0, 999), body


@pytest.mark.parametrize("still_running", [1, 12])  # 12: past the reasons examined from the end alone
def test_a_whole_stream_in_one_piece_gives_its_usage_last_reason_and_loses_only_the_usage_only_chunk(
    still_running: int,
) -> None:
    def event(obj: dict) -> bytes:
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    choice = {"index": 0, "delta": {"content": "x"}, "finish_reason": None}
    usage_only = event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 31}})
    stream = (
        b"".join(event({"choices": [choice]}) for _ in range(30))
        + event({"choices": [{**choice, "finish_reason": "length"}]})
        # n=2: a later choice still running (null reasons)
        + b"".join(event({"choices": [{**choice, "index": 1}]}) for _ in range(still_running))
        + usage_only
        + b"data: [DONE]\n\n"
    )
    counter = UsageCounter()
    counter.feed_sse(stream)
    assert (counter.prompt, counter.completion, counter.finish_reason) == (7, 31, "length")
    kept = UsageChunkFilter().feed(stream)
    assert b'"usage"' not in kept and kept.endswith(b"data: [DONE]\n\n")
    assert kept == stream.replace(usage_only, b"")


def test_running_usage_in_one_piece_keeps_the_final_totals() -> None:
    # vLLM's continuous_usage_stats: every chunk carries the running usage, the usage-only chunk the total.
    stream = (
        _sse(
            [
                {
                    "choices": [{"delta": {"content": "a"}}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1},
                },
                {
                    "choices": [{"delta": {}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 2},
                },
                {
                    "choices": [],
                    "usage": {
                        "prompt_tokens": 5,
                        "completion_tokens": 2,
                        "prompt_tokens_details": {"cached_tokens": 4},
                        "completion_tokens_details": {"reasoning_tokens": 1},
                    },
                },
            ]
        )
        + b"data: [DONE]\n\n"
    )
    counter = UsageCounter()
    counter.feed_sse(stream)
    assert (counter.prompt, counter.completion, counter.cached, counter.reasoning) == (5, 2, 4, 1)
    assert counter.finish_reason == "stop"
    kept = UsageChunkFilter().feed(stream)
    assert kept.count(b'"usage"') == 2 and b'"choices": []' not in kept


def test_anthropic_and_responses_streams_in_one_piece() -> None:
    anthropic = _sse(
        [
            {
                "type": "message_start",
                "message": {"usage": {"input_tokens": 9, "output_tokens": 1, "cache_read_input_tokens": 6}},
            },
            {"type": "content_block_delta", "delta": {"text": "x"}},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 5}},
            {"type": "message_stop"},
        ],
        named=True,
    )
    counter = UsageCounter()
    counter.feed_sse(anthropic)
    # message_delta's usage is not final: the input and cache tokens come from message_start before it
    assert (counter.prompt, counter.completion, counter.cached, counter.finish_reason) == (
        9,
        5,
        6,
        "end_turn",
    )

    responses = _sse(
        [
            {"type": "response.created", "response": {"status": "in_progress", "usage": None}},
            {"type": "response.output_text.delta", "delta": "x"},
            {
                "type": "response.completed",
                "response": {"status": "completed", "usage": {"input_tokens": 3, "output_tokens": 8}},
            },
        ],
        named=True,
    )
    counter = UsageCounter()
    counter.feed_sse(responses)
    assert (counter.prompt, counter.completion, counter.finish_reason) == (3, 8, "completed")


@pytest.mark.parametrize(
    "usage",
    [
        {
            "prompt_tokens": True,
            "completion_tokens": "30",
            "completion_tokens_details": {"reasoning_tokens": 1.5},
        },
        {"input_tokens": None, "output_tokens": False, "cache_read_input_tokens": True},
        {
            "prompt_tokens": 2.0,
            "prompt_tokens_details": {"cached_tokens": "8"},
            "completion_tokens_details": [],
        },
    ],
)
def test_counts_that_are_not_ints_are_ignored(usage):
    counter = UsageCounter()
    counter.feed_json({"usage": usage})
    assert (counter.prompt, counter.completion, counter.reasoning, counter.cached) == (0, 0, 0, 0)
    assert not counter.reasoning_reported


def test_openai_and_anthropic_names_each_give_every_count():
    openai, anthropic = UsageCounter(), UsageCounter()
    openai.feed_json(
        {
            "usage": {
                "prompt_tokens": 12,
                "completion_tokens": 30,
                "prompt_tokens_details": {"cached_tokens": 8},
                "completion_tokens_details": {"reasoning_tokens": 20},
            }
        }
    )
    anthropic.feed_json({"usage": {"input_tokens": 5, "output_tokens": 7, "cache_read_input_tokens": 2}})
    assert (openai.prompt, openai.completion, openai.cached, openai.reasoning) == (12, 30, 8, 20)
    assert (anthropic.prompt, anthropic.completion, anthropic.cached, anthropic.reasoning) == (5, 7, 2, 0)


def test_the_first_finish_reason_is_found_as_a_regex_search_finds_it():
    from serve.gateway.usage import _FINISH, _first_finish

    bodies = [
        b'{"choices":[{"finish_reason":null},{"finish_reason":"length"}],"usage":{}}',
        b'{"content":"say \\"finish_reason\\": \\"x\\"","choices":[{"finish_reason":"stop"}]}',
        b'{"my_reason": "no", "stop_reason": "end_turn"}',
        b'{"finish_reason": "tool_calls", "other_reason": "x"}',
        b'{"finish_reason":"a_reason"}',
        b'{"reason": "none here"}',
        b"",
    ]
    for body in bodies:
        expected = _FINISH.search(body)
        found = _first_finish(body)
        assert found is None if expected is None else found is not None
        if expected is not None and found is not None:
            assert (found.start(), found.group(1)) == (expected.start(), expected.group(1))
