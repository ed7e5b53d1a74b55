"""finetune.data: loading, validating and normalising chat JSONL, and the train/eval split."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from finetune.data import DataError, Sample, load_samples, split

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
GOOD = FIXTURES / "good.jsonl"
BAD = FIXTURES / "bad.jsonl"
MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str | None, **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": text, **extra}


def call(name: str, arguments: Any, call_id: str | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id is not None:
        result["id"] = call_id
    return result


def tool(text: str, call_id: str | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {"role": "tool", "content": text}
    if call_id is not None:
        result["tool_call_id"] = call_id
    return result


def write(tmp_path: Path, *lines: Any) -> Path:
    """A JSONL file with one line per argument: strings verbatim, anything else as JSON."""
    path = tmp_path / "data.jsonl"
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(DataError) as info:
        load_samples(path)
    return info.value.problems


def by_line(path: Path, problems: list[str]) -> dict[int, list[str]]:
    """Group ``PATH:LINE: message`` problems by line (asserting every one has the prefix)."""
    grouped: dict[int, list[str]] = {}
    for problem in problems:
        prefix, _, message = problem.partition(": ")
        file, _, line = prefix.rpartition(":")
        assert file == str(path), problem
        grouped.setdefault(int(line), []).append(message)
    return grouped


def contents(sample: Sample) -> list[str]:
    return [m["content"] for m in sample.messages]


# --- the good fixture -----------------------------------------------------------------------------


def test_good_fixture_loads_every_conversation_with_its_line() -> None:
    samples = load_samples(GOOD)
    assert [s.line for s in samples] == [1, 2, 3, 4, 5, 6]
    for sample in samples:
        for message in sample.messages:
            assert set(message) <= MESSAGE_KEYS
            assert isinstance(message["content"], str)
            for text in (message["content"], message.get("reasoning_content", "")):
                assert "<think>" not in text and "</think>" not in text


def test_good_fixture_plain_and_multi_turn_are_unchanged() -> None:
    plain, multi = load_samples(GOOD)[:2]
    assert plain.messages == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    assert plain.tools is None
    assert [m["role"] for m in multi.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert contents(multi)[-1] == "Yes: flour, water and salt only."


def test_good_fixture_tool_calls_are_normalised() -> None:
    sample = load_samples(GOOD)[2]
    assert sample.tools is not None
    assert [t["function"]["name"] for t in sample.tools] == ["get_weather", "get_time"]
    call_turn = sample.messages[1]
    assert call_turn["content"] == ""  # null content with tool calls becomes ""
    assert call_turn["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}},
        },
        {
            "id": "call_2",
            "type": "function",
            "function": {"name": "get_time", "arguments": {"timezone": "Asia/Tokyo"}},
        },
    ]
    assert [m.get("tool_call_id") for m in sample.messages[2:4]] == ["call_2", "call_1"]
    assert sample.messages[2]["content"] == '{"time": "21:04"}'
    assert sample.messages[-1] == {"role": "assistant", "content": "Oslo: -3 °C and snowing. Tokyo: 21:04."}


def test_good_fixture_reasoning_content_is_kept() -> None:
    sample = load_samples(GOOD)[3]
    assert sample.messages[-1] == {
        "role": "assistant",
        "content": "No: 91 = 7 * 13.",
        "reasoning_content": "91 = 7 * 13, so it is not prime.",
    }


def test_good_fixture_only_closing_think_tag_splits_reasoning() -> None:
    sample = load_samples(GOOD)[4]
    assert sample.messages[-1] == {
        "role": "assistant",
        "content": "Red.",
        "reasoning_content": "Any of red, yellow or blue will do.",
    }


def test_good_fixture_text_parts_are_joined_then_thinking_split() -> None:
    sample = load_samples(GOOD)[5]
    assert sample.messages == [
        {"role": "user", "content": "Translate to German: good morning"},
        {"role": "assistant", "content": "Guten Morgen.", "reasoning_content": "A greeting."},
    ]


# --- the bad fixture: every problem, with its line, in one error ------------------------------------

BAD_EXPECTED = {
    3: ["invalid JSON at column 48"],
    4: ["unknown key 'mesages' (allowed: messages, tools)", '"messages" is missing'],
    5: ['messages[1]: "role" is missing (allowed: system, user, assistant, tool)'],
    6: ["messages[1]: unknown role 'bot' (allowed: system, user, assistant, tool)"],
    7: ["messages[0] (user): content is empty"],
    8: ["messages[1] (system): a system message is only allowed as the first message"],
    9: ["must end with an assistant message", "ends with 'user'"],
    10: ["messages[1] (tool): tool message without a matching call", "must follow an assistant message"],
    11: ["messages[2] (tool): tool message without a matching call", "tool_call_id 'call_b'", "'call_a'"],
    12: ['tool_calls[0]: "function.arguments" is invalid JSON at column 10'],
    13: ["messages[1] (assistant): unterminated thinking: <think> without </think>"],
    14: ["duplicate of line 1"],
    15: ["messages[0] (user): content[1] is a part of type 'image_url'", "text only"],
}


def test_bad_fixture_reports_every_problem_with_its_line_at_once() -> None:
    problems = problems_of(BAD)
    grouped = by_line(BAD, problems)
    assert sorted(grouped) == sorted(BAD_EXPECTED)  # line 1 is valid, line 2 is blank
    for line, expected in BAD_EXPECTED.items():
        found = grouped[line]
        # Line 4 has two problems (one each); every other line has exactly one, naming all the parts.
        if line == 4:
            assert len(found) == 2
            for part, message in zip(expected, found, strict=True):
                assert part in message, (line, found)
        else:
            assert len(found) == 1, (line, found)
            for part in expected:
                assert part in found[0], (line, part, found)


def test_data_error_str_lists_every_problem_then_the_hint() -> None:
    with pytest.raises(DataError) as info:
        load_samples(BAD)
    lines = str(info.value).splitlines()
    assert lines[:-1] == info.value.problems
    assert len(lines) == 15  # 14 problems and the hint
    assert lines[-1] == f"Fix these lines and run `make validate-data DATA={BAD}` again; nothing was trained."
    assert info.value.path == BAD


def test_data_error_survives_pickling() -> None:
    error = DataError(["x.jsonl:3: bad"], Path("x.jsonl"))
    copy = pickle.loads(pickle.dumps(error))
    assert copy.problems == ["x.jsonl:3: bad"]
    assert copy.path == Path("x.jsonl")
    assert str(copy) == str(error)


# --- file-level problems ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda tmp: tmp / "missing.jsonl", "no such file"),
        (lambda tmp: tmp, "is a directory"),
        (lambda tmp: _file(tmp, b""), "the file is empty"),
        (lambda tmp: _file(tmp, b"\n  \n\t\n"), "the file is empty"),
    ],
    ids=["missing", "directory", "empty", "only-blank-lines"],
)
def test_file_problems_are_one_problem_with_a_hint(tmp_path: Path, make: Any, expected: str) -> None:
    path = make(tmp_path)
    with pytest.raises(DataError) as info:
        load_samples(path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{path}: ")
    assert expected in info.value.problems[0]
    assert f"make validate-data DATA={path}" in str(info.value).splitlines()[-1]


def _file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    return path


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    good = {"messages": [user("hi"), assistant("hello")]}
    path = write(tmp_path, "", good, "   ", {"messages": [user("a"), assistant("b")]})
    assert [s.line for s in load_samples(path)] == [2, 4]


def test_non_utf8_line_is_reported_with_the_other_problems(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n{"messages": []}\n',
    )
    grouped = by_line(path, problems_of(path))
    assert grouped == {
        1: ["not valid UTF-8 text"],
        2: ['"messages" must be a non-empty list of messages, got an empty list'],
    }


def test_utf8_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    path = _file(tmp_path, b"\xef\xbb\xbf" + json.dumps({"messages": [user("a"), assistant("b")]}).encode())
    assert len(load_samples(path)) == 1


# --- one rule per line: exactly one problem, on line 1 ----------------------------------------------

CALL_TURN = assistant(None, tool_calls=[call("f", {}, "c1")])

ONE_PROBLEM = {
    "not-an-object": ("[1, 2]", 'expected a JSON object with "messages", got a list'),
    "duplicate-json-key": (
        '{"messages": [{"role": "user", "role": "user", "content": "a"}, '
        '{"role": "assistant", "content": "b"}]}',
        "invalid JSON: duplicate key 'role'",
    ),
    "nan": (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", '
        '"tool_calls": [{"function": {"name": "f", "arguments": {"x": NaN}}}]}]}',
        "NaN is not valid JSON",
    ),
    "unknown-top-level-key": (
        {"messages": [user("a"), assistant("b")], "meta": {}},
        "unknown key 'meta' (allowed: messages, tools)",
    ),
    "messages-not-a-list": (
        {"messages": "hi"},
        '"messages" must be a non-empty list of messages, got a string',
    ),
    "message-not-an-object": (
        {"messages": [user("a"), "b", assistant("c")]},
        "messages[1]: expected a message object",
    ),
    "unknown-message-key": (
        {"messages": [{"role": "user", "contnet": "a", "content": "a"}, assistant("b")]},
        "messages[0] (user): unknown key 'contnet'",
    ),
    "tool-calls-on-user": (
        {"messages": [{**user("a"), "tool_calls": [call("f", {})]}, assistant("b")]},
        "messages[0] (user): 'tool_calls' is only allowed on assistant messages",
    ),
    "tool-call-id-on-user": (
        {"messages": [{**user("a"), "tool_call_id": "x"}, assistant("b")]},
        "'tool_call_id' is only allowed on tool messages",
    ),
    "no-user-message": (
        {"messages": [{"role": "system", "content": "s"}, assistant("b")]},
        "the conversation has no user message",
    ),
    "missing-content": (
        {"messages": [user("a"), {"role": "assistant"}]},
        "messages[1] (assistant): content is missing",
    ),
    "empty-assistant-content": ({"messages": [user("a"), assistant("")]}, "content is empty"),
    "content-not-text": (
        {"messages": [user("a"), assistant(3)]},
        "content must be a string or a list of text parts",
    ),
    "text-part-without-text": (
        {"messages": [{"role": "user", "content": [{"type": "text"}]}, assistant("b")]},
        'content[0]: a text part needs "text" as a string',
    ),
    "empty-tool-content": (
        {"messages": [user("a"), CALL_TURN, tool(" ", "c1"), assistant("b")]},
        "(tool): content is empty",
    ),
    "blank-name": (
        {"messages": [{**user("a"), "name": " "}, assistant("b")]},
        '"name" must be a non-empty string',
    ),
    "think-tags-in-user-content": (
        {"messages": [user("what does </think> do?"), assistant("b")]},
        "<think>/</think> are only allowed in assistant content",
    ),
    "thinking-given-twice": (
        {"messages": [user("a"), assistant("r</think>b", reasoning_content="r")]},
        "thinking given twice",
    ),
    "reasoning-not-a-string": (
        {"messages": [user("a"), assistant("b", reasoning_content=["r"])]},
        '"reasoning_content" must be a string, got a list',
    ),
    "think-tag-in-reasoning-content": (
        {"messages": [user("a"), assistant("b", reasoning_content="<think>r")]},
        '"reasoning_content" must not contain <think>',
    ),
    "two-thinking-blocks": (
        {"messages": [user("a"), assistant("<think>r</think>b<think>s</think>c")]},
        "more than one thinking block",
    ),
    "text-before-think": (
        {"messages": [user("a"), assistant("Hi <think>r</think>b")]},
        "<think> must open the content",
    ),
    "only-thinking": (
        {"messages": [user("a"), assistant("<think>r</think>\n")]},
        "content is empty after </think>",
    ),
    "tool-calls-not-a-list": (
        {"messages": [user("a"), assistant("b", tool_calls={"x": 1})]},
        '"tool_calls" must be a list, got an object',
    ),
    "call-without-name": (
        {"messages": [user("a"), assistant(None, tool_calls=[call("", {})])]},
        'tool_calls[0]: "function.name" must be a non-empty string',
    ),
    "call-without-arguments": (
        {"messages": [user("a"), assistant(None, tool_calls=[{"function": {"name": "f"}}])]},
        '"function.arguments" is missing',
    ),
    "call-arguments-json-list": (
        {"messages": [user("a"), assistant(None, tool_calls=[call("f", "[1]")])]},
        '"function.arguments" must be a JSON object, got a list',
    ),
    "call-arguments-number": (
        {"messages": [user("a"), assistant(None, tool_calls=[call("f", 3)])]},
        '"function.arguments" must be an object or a JSON string, got a number',
    ),
    "call-wrong-type": (
        {"messages": [user("a"), assistant(None, tool_calls=[{**call("f", {}), "type": "code"}])]},
        '"type" must be "function", got \'code\'',
    ),
    "call-unknown-key": (
        {"messages": [user("a"), assistant(None, tool_calls=[{**call("f", {}), "index": 0}])]},
        "tool_calls[0]: unknown key 'index'",
    ),
    "duplicate-call-id": (
        {
            "messages": [
                user("a"),
                CALL_TURN,
                tool("x", "c1"),
                assistant(None, tool_calls=[call("g", {}, "c1")]),
            ]
        },
        "messages[3] (assistant): tool_calls[0]: duplicate tool call id 'c1' (used in messages[1])",
    ),
    "call-answered-twice": (
        {"messages": [user("a"), CALL_TURN, tool("x", "c1"), tool("y", "c1"), assistant("b")]},
        "messages[3] (tool): tool message without a matching call: call 'c1' is already answered",
    ),
    "answered-by-position-then-by-id": (
        {"messages": [user("a"), CALL_TURN, tool("x"), tool("y", "c1"), assistant("b")]},
        "messages[3] (tool): tool message without a matching call: call 'c1' is already answered",
    ),
    "more-answers-than-calls": (
        {"messages": [user("a"), CALL_TURN, tool("x"), tool("y"), assistant("b")]},
        "messages[3] (tool): tool message without a matching call: every call before it is already answered",
    ),
    "answer-after-a-user-turn": (
        {"messages": [user("a"), CALL_TURN, user("never mind"), tool("x", "c1"), assistant("b")]},
        "messages[3] (tool): tool message without a matching call: a tool message must follow",
    ),
    "tools-not-a-list": (
        {"messages": [user("a"), assistant("b")], "tools": {"type": "function"}},
        '"tools" must be a list',
    ),
    "tool-wrong-type": (
        {
            "messages": [user("a"), assistant("b")],
            "tools": [{"type": "retrieval", "function": {"name": "f"}}],
        },
        'tools[0]: "type" must be "function", got \'retrieval\'',
    ),
    "tool-without-name": (
        {
            "messages": [user("a"), assistant("b")],
            "tools": [{"type": "function", "function": {"description": "d"}}],
        },
        'tools[0]: "function.name" must be a non-empty string',
    ),
}


@pytest.mark.parametrize(("line", "expected"), list(ONE_PROBLEM.values()), ids=list(ONE_PROBLEM))
def test_each_rule_reports_one_problem_on_its_line(tmp_path: Path, line: Any, expected: str) -> None:
    path = write(tmp_path, line)
    problems = problems_of(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:1: ")
    assert expected in problems[0], problems[0]


def test_all_problems_of_one_line_are_reported_together(tmp_path: Path) -> None:
    line = {
        "messages": [
            user("a"),
            {"role": "robot", "content": "b"},
            assistant(None, tool_calls=[call("f", "{oops", "c1")]),
            tool("", "c1"),
            assistant("<think>never closed"),
        ],
        "extra": 1,
    }
    path = write(tmp_path, {"messages": [user("ok"), assistant("ok")]}, line)
    grouped = by_line(path, problems_of(path))
    assert list(grouped) == [2]
    messages = grouped[2]
    assert len(messages) == 5, messages
    for part in (
        "unknown key 'extra'",
        "unknown role 'robot'",
        "is invalid JSON",
        "(tool): content is empty",
    ):
        assert any(part in m for m in messages), (part, messages)
    assert any("unterminated thinking" in m for m in messages)


def test_duplicate_names_the_first_line_and_compares_normalised_samples(tmp_path: Path) -> None:
    first = {"messages": [user("a"), assistant(None, tool_calls=[call("f", {"x": 1}, "c1")])]}
    same = {"messages": [user("a"), assistant("", tool_calls=[call("f", '{"x": 1}', "c1")])]}
    other = {"messages": [user("a"), assistant(None, tool_calls=[call("f", {"x": 2}, "c1")])]}
    path = write(tmp_path, first, other, "", same, same)
    assert by_line(path, problems_of(path)) == {
        4: ["duplicate of line 1 (the same conversation)"],
        5: ["duplicate of line 1 (the same conversation)"],
    }


# --- valid edge cases and their normalisation -------------------------------------------------------


def load_one(tmp_path: Path, line: Any) -> Sample:
    samples = load_samples(write(tmp_path, line))
    assert len(samples) == 1
    return samples[0]


def test_tool_messages_without_ids_answer_calls_in_order(tmp_path: Path) -> None:
    line = {
        "messages": [
            user("a"),
            assistant("Let me check.", tool_calls=[call("f", '{"q": "x"}'), call("g", {})]),
            tool("fx"),
            tool("gx"),
            assistant("done"),
        ]
    }
    sample = load_one(tmp_path, line)
    assert sample.messages[1] == {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [
            {"id": None, "type": "function", "function": {"name": "f", "arguments": {"q": "x"}}},
            {"id": None, "type": "function", "function": {"name": "g", "arguments": {}}},
        ],
    }
    assert sample.messages[2] == {"role": "tool", "content": "fx"}


def test_a_conversation_may_end_with_a_tool_call(tmp_path: Path) -> None:
    sample = load_one(
        tmp_path, {"messages": [user("a"), assistant(None, tool_calls=[call("f", "{}", "c1")])]}
    )
    assert sample.messages[-1]["tool_calls"][0]["function"] == {"name": "f", "arguments": {}}
    assert sample.messages[-1]["content"] == ""


def test_calls_of_a_later_turn_can_be_answered_without_ids(tmp_path: Path) -> None:
    line = {
        "messages": [
            user("a"),
            CALL_TURN,
            tool("x", "c1"),
            assistant(None, tool_calls=[call("g", {}, "c2")]),
            tool("y"),
            assistant("b"),
        ]
    }
    assert [m["role"] for m in load_one(tmp_path, line).messages][-2:] == ["tool", "assistant"]


@pytest.mark.parametrize(
    ("message", "content", "reasoning"),
    [
        (assistant("<think>\n\n</think>\n\nHi"), "Hi", None),
        (assistant("Hi", reasoning_content="  \n"), "Hi", None),
        (assistant("Hi", reasoning_content=None), "Hi", None),
        (assistant("<think>\nstep 1\nstep 2\n</think>\n\nAnswer\n"), "Answer\n", "step 1\nstep 2"),
        (assistant("plan</think>answer"), "answer", "plan"),
        (assistant("  Hi  ", reasoning_content="  r  "), "  Hi  ", "r"),
        (assistant(None, tool_calls=[call("f", {})], reasoning_content="r"), "", "r"),
        (assistant("r</think>", tool_calls=[call("f", {})]), "", "r"),
    ],
)
def test_thinking_normalisation(
    tmp_path: Path, message: dict[str, Any], content: str, reasoning: str | None
) -> None:
    last = load_one(tmp_path, {"messages": [user("q"), message]}).messages[-1]
    assert last["content"] == content
    assert last.get("reasoning_content") == reasoning
    assert ("reasoning_content" in last) == (reasoning is not None)


def test_name_is_kept_and_empty_tools_become_none(tmp_path: Path) -> None:
    sample = load_one(tmp_path, {"messages": [{**user("a"), "name": "alice"}, assistant("b")], "tools": []})
    assert sample.messages[0] == {"role": "user", "content": "a", "name": "alice"}
    assert sample.tools is None


# --- split ------------------------------------------------------------------------------------------


def samples(n: int) -> list[Sample]:
    return [Sample(line=i + 1, messages=[user(str(i)), assistant("x")], tools=None) for i in range(n)]


@pytest.mark.parametrize(
    ("n", "fraction", "n_eval"),
    [
        (10, 0.0, 0),
        (10, 0.1, 1),
        (10, 0.25, 2),  # round(2.5) == 2
        (10, 0.35, 4),  # round(3.5) == 4
        (10, 0.99, 9),  # train is never empty
        (2, 0.01, 1),  # at least one eval sample once there are two
        (1, 0.5, 0),  # a single sample always trains
        (1, 0.0, 0),
        (100, 0.05, 5),
    ],
)
def test_split_sizes(n: int, fraction: float, n_eval: int) -> None:
    data = samples(n)
    train, evals = split(data, fraction, seed=0)
    assert len(evals) == n_eval
    assert len(train) == n - n_eval
    assert {s.line for s in train} | {s.line for s in evals} == {s.line for s in data}
    assert not {s.line for s in train} & {s.line for s in evals}
    assert [s.line for s in train] == sorted(s.line for s in train)  # input order kept
    assert [s.line for s in evals] == sorted(s.line for s in evals)


def test_split_is_deterministic_per_seed_and_leaves_its_input_alone() -> None:
    data = samples(50)
    before = list(data)
    first = split(data, 0.2, seed=7)
    assert split(data, 0.2, seed=7) == first
    assert data == before
    eval_sets = {tuple(s.line for s in split(data, 0.2, seed=seed)[1]) for seed in range(5)}
    assert len(eval_sets) > 1  # the seed matters


@pytest.mark.parametrize(
    ("n", "fraction", "expected"),
    [
        (10, 1.0, "eval_fraction must be in [0, 1)"),
        (10, -0.1, "eval_fraction must be in [0, 1)"),
        (10, float("nan"), "eval_fraction must be in [0, 1)"),
        (0, 0.1, "cannot split an empty list"),
        (0, 0.0, "cannot split an empty list"),
    ],
)
def test_split_rejects_bad_arguments(n: int, fraction: float, expected: str) -> None:
    with pytest.raises(ValueError) as info:
        split(samples(n), fraction, seed=0)
    assert expected in str(info.value)
