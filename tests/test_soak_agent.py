"""The agent-loop soak (scripts/soak_agent.py): a short run of `make soak-agent` against real vLLM through
the gateway, and each of its checks shown to catch the fault it names (the loop driven through the real
``openai`` SDK against a scripted HTTP transport, the checks fed hand-made answers)."""

from __future__ import annotations

import importlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import func, select

from serve.gateway.store import LedgerRow, open_engine

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "soak_agent.py"


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``soak_agent_loop`` (it sits beside the script, which imports it so)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    return importlib.import_module("soak_agent_loop")


@pytest.fixture
def ledger(monkeypatch: pytest.MonkeyPatch) -> tuple[ModuleType, ModuleType]:
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    return importlib.import_module("soak_agent_ledger"), importlib.import_module("soak_ledger_reconcile")


@pytest.fixture
def short_workdir() -> Iterator[Path]:
    """A work folder with a short path: vLLM's ZMQ sockets live under it, and a Unix socket path may not
    pass 107 bytes (pytest's own tmp_path is too deep for that)."""
    work = Path(tempfile.mkdtemp(prefix="kit-sa-"))
    yield work
    shutil.rmtree(work, ignore_errors=True)


@pytest.mark.integration
def test_a_short_soak_chains_real_tool_calls_with_no_protocol_error_and_a_row_per_request(
    tmp_path: Path, short_workdir: Path
):
    work, out = short_workdir, tmp_path / "agent.json"
    args = ["--calls", "20", "--replay-every", "3", "--workdir", str(work), "--json", str(out), "--no-readme"]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=540
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "RESULT:    OK" in done.stdout
    record = json.loads(out.read_text())
    loop = record["agent"]
    assert loop["tool_calls"] >= 20 and loop["protocol_errors"] == 0 and record["problems"] == []
    choices = loop["by_tool_choice"]
    # Forced turns always call; each call's result went back.
    for forced in ("required", "named"):
        assert choices[forced]["calls"] == choices[forced]["turns"] > 0
        assert 0 < choices[forced]["streamed"] < choices[forced]["turns"]
    assert loop["results_fed_back"] == loop["tool_calls"]
    assert choices["auto"]["turns"] > 0  # counted whatever the model did (text, mostly)
    assert loop["replays_by_first_mode"]["streamed first"] > 0
    assert loop["replays_by_first_mode"]["non-streamed first"] > 0
    assert loop["history"]["max_model_len"] == 1024 and loop["history"]["trims"] > 0
    assert loop["tokens"]["prompt_per_turn_max"] <= 1024 - 64
    assert loop["tokens"]["completion"] > 0
    result = record["ledger"]
    assert result["ok"] and result["requests"] == loop["requests"] == result["rows_in_usage_ledger"]
    assert result["lost"] == result["duplicated"] == result["unknown"] == result["mismatches"] == 0
    assert result["outcomes"] == {"ok 200": loop["requests"]}
    assert (result["prompt_tokens"], result["completion_tokens"]) == (
        loop["tokens"]["prompt"],
        loop["tokens"]["completion"],
    )
    assert record["gateway"]["exit_code"] == 0 and record["gateway"]["log"]["tracebacks"] == 0
    # The ledger itself, read here without the script: one usage_ledger row per request, under its key.
    engine = open_engine(f"sqlite:///{work / 'gw.sqlite'}", create=False)
    with engine.connect() as connection:
        rows = connection.execute(
            select(func.count(), func.count(LedgerRow.request_id.distinct())).where(
                LedgerRow.key_name == "soak-agent"
            )
        ).one()
    engine.dispose()
    assert tuple(rows) == (loop["requests"], loop["requests"])


# --- The loop through the real SDK, against a scripted server --------------------------------------------


ARGUMENTS = {
    "add": {"a": 1, "b": 2},
    "get_weather": {"city": "Oslo", "unit": "celsius"},
    "get_time": {"city": "Oslo"},
}


class ScriptedServer:
    """Answers ``/v1/models`` and ``/v1/chat/completions`` the way vLLM does (a forced tool_choice gets
    one call, ``auto`` gets text), streamed as SSE or not; ``fault`` breaks one thing on purpose."""

    def __init__(self, fault: str | None = None, prompt_tokens: int = 300) -> None:
        self.fault = fault
        self.prompt_tokens = prompt_tokens
        self.requests: list[dict[str, Any]] = []
        self.counter = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(
                200, json={"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": 1024}]}
            )
        body = json.loads(request.content)
        self.requests.append(body)
        self.counter += 1
        # The prompt grows with the history, as a real one would (40 tokens a message).
        prompt = self.prompt_tokens + 40 * len(body["messages"])
        choice = body.get("tool_choice")
        calls = []
        if choice != "auto":
            name = choice["function"]["name"] if isinstance(choice, dict) else "add"
            arguments = ARGUMENTS[name]
            if self.fault in ("outside_schema", "cut_outside_schema"):
                arguments = {"a": "one"} if name == "add" else {"city": "a city name too long"}
            if self.fault == "wrong_tool" and isinstance(choice, dict):
                name = "get_time" if name != "get_time" else "add"
            call_id = "call-same" if self.fault == "reused_id" else f"call-{self.counter}"
            calls.append({"id": call_id, "name": name, "arguments": json.dumps(arguments)})
        content = None if calls else ("" if self.fault == "empty" else "some text")
        usage = {"prompt_tokens": prompt, "completion_tokens": 7, "total_tokens": prompt + 7}
        if body.get("stream"):
            return self._stream(calls, content, usage)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in calls
            ]
        if self.fault == "plain_arguments_differ" and calls:
            message["tool_calls"][0]["function"]["arguments"] = json.dumps({"a": 9, "b": 2})
        return httpx.Response(
            200,
            json={
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "message": message, "finish_reason": self.finish(calls)}],
                "usage": usage,
            },
        )

    def finish(self, calls: list[dict[str, str]]) -> str:
        if self.fault == "cut_outside_schema":
            return "length"
        return "tool_calls" if calls else "stop"

    def _stream(
        self, calls: list[dict[str, str]], content: str | None, usage: dict[str, int]
    ) -> httpx.Response:
        base = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m"}
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        if content:
            deltas += [{"content": content[:4]}, {"content": content[4:]}]
        for index, call in enumerate(calls):
            arguments = call["arguments"]
            pieces = [arguments[:5], arguments[5:]]
            if self.fault == "broken_stream_arguments":
                pieces = [arguments[:1], arguments[2:]]  # a quote lost between deltas
            deltas.append(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": call["name"], "arguments": ""},
                        }
                    ]
                }
            )
            deltas += [{"tool_calls": [{"index": index, "function": {"arguments": p}}]} for p in pieces]
        events = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
        events.append(
            {
                **base,
                "choices": [{"index": 0, "delta": {}, "finish_reason": self.finish(calls)}],
            }
        )
        if self.fault != "no_usage_chunk":
            events.append({**base, "choices": [], "usage": usage})
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, content=text.encode(), headers={"content-type": "text/event-stream"})


def run_loop(agent: ModuleType, server: ScriptedServer, calls: int = 30, replay_every: int = 3) -> Any:
    client = openai.OpenAI(
        base_url="http://gateway.test/v1",
        api_key="sk-test",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(server)),
    )
    return agent.AgentLoop(client, "m", calls, "t", seed=0, replay_every=replay_every).run()


def test_the_loop_through_the_sdk_feeds_every_result_back_with_its_call_s_id(agent):
    server = ScriptedServer()
    result = run_loop(agent, server)
    assert result.problems == [] and result.calls >= 30
    assert result.results_fed_back == result.calls
    assert set(result.by_choice) == {"required", "named", "auto"}
    assert result.replayed["streamed first"] > 0 and result.replayed["non-streamed first"] > 0
    # Every request the server got paired each call with its result, and fit the context.
    for body in server.requests:
        assert agent.pairing_problems(body["messages"]) == []
    fed = [m for body in server.requests for m in body["messages"] if m["role"] == "tool"]
    assert fed and all(m["tool_call_id"].startswith("call-") for m in fed)
    prompts = [40 * len(body["messages"]) + 300 for body in server.requests]
    assert max(prompts) + agent.CALL_MAX_TOKENS + agent.CONTEXT_MARGIN <= 1024
    assert result.trims > 0 and result.dropped_units > 0
    # Each request is in the list the ledger is reconciled with, the models listing included.
    assert len(result.sent) == len(server.requests) + 1
    assert len({s.request_id for s in result.sent}) == len(result.sent)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("broken_stream_arguments", "arguments are not JSON"),
        ("plain_arguments_differ", "calls differ"),
        ("reused_id", "id used before"),
        ("wrong_tool", "tool_choice named"),
        ("empty", "neither content nor a tool call"),
        ("no_usage_chunk", "no usage chunk"),
    ],
)
def test_the_loop_reports_each_protocol_fault_it_is_shown(agent, fault, expected):
    result = run_loop(agent, ScriptedServer(fault), calls=12)
    assert result.problems, f"{fault} went unnoticed"
    assert any(expected in p.problem for p in result.problems), [p.problem for p in result.problems]


@pytest.mark.parametrize(
    ("fault", "finish"), [("outside_schema", "tool_calls"), ("cut_outside_schema", "length")]
)
def test_calls_outside_their_strict_schema_are_counted_by_finish_reason_not_failed(agent, fault, finish):
    result = run_loop(agent, ScriptedServer(fault), calls=12)
    assert result.problems == []
    assert result.outside_schema == {finish: result.calls} and result.calls >= 12
    counted = result.to_json()["calls_outside_strict_schema"]
    assert counted["by_finish_reason"] == {finish: result.calls}
    assert len(counted["samples"]) == 10 and "is too long" in "".join(counted["samples"])
    assert "'one' is not of type 'integer'" in "".join(counted["samples"])
    # "one" for an integer is not whitespace; a city 8 letters too long is not either.
    assert result.outside_schema_by_whitespace == 0
    assert run_loop(agent, ScriptedServer(), 12).outside_schema == {}


def test_a_schema_break_by_whitespace_around_a_string_alone_is_told_apart(agent):
    padded = answer(agent, ("c1", "get_weather", '{"city": "Oslo", "unit": "\\ncelsius \\n\\n "}'))
    long_city = answer(agent, ("c2", "get_time", '{"city": "a city name too long"}'))
    valid = answer(agent, ("c3", "add", '{"a": 1, "b": 2}'))
    [(line, whitespace)] = agent.schema_problems(padded)
    assert whitespace and "is not one of ['celsius', 'fahrenheit']" in line
    [(line, whitespace)] = agent.schema_problems(long_city)
    assert not whitespace and "is too long" in line
    assert agent.schema_problems(valid) == []


def test_an_http_error_is_a_protocol_error_and_ends_the_run(agent):
    server = ScriptedServer()

    def failing(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/chat/completions") and server.counter >= 4:
            return httpx.Response(400, json={"error": {"message": "context too long", "code": 400}})
        return server(request)

    client = openai.OpenAI(
        base_url="http://gateway.test/v1",
        api_key="k",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(failing)),
    )
    result = agent.AgentLoop(client, "m", 50, "t").run()
    assert result.calls < 50 and result.turns == 5
    assert (
        "BadRequestError" in result.problems[-1].problem and "context too long" in result.problems[-1].problem
    )
    assert result.sent[-1].ok is False


# --- The checks, one fault at a time ---------------------------------------------------------------------


def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> Any:
    from openai.types.chat import ChatCompletionChunk

    choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
    body: dict[str, Any] = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    return ChatCompletionChunk.model_validate({**body, "choices": choices, "usage": usage})


def test_streamed_calls_are_assembled_by_index_from_their_deltas(agent):
    chunks = [
        chunk({"role": "assistant", "content": "<tool_call>\n"}),
        chunk({"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "add"}}]}),
        chunk(
            {"tool_calls": [{"index": 1, "id": "c2", "type": "function", "function": {"name": "get_time"}}]}
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": '}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"city": "Rome"}'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '1, "b": 2}'}}]}),
        chunk({}, finish="tool_calls"),
        chunk({}, usage={"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}),
    ]
    answer = agent.answer_from_chunks("r", chunks)
    assert [(c.id, c.name, c.parsed()) for c in answer.calls] == [
        ("c1", "add", {"a": 1, "b": 2}),
        ("c2", "get_time", {"city": "Rome"}),
    ]
    assert (answer.finish_reason, answer.usage, answer.chunks) == ("tool_calls", (9, 4), 8)
    turn = agent.Turn(1, "required", True, False)
    assert agent.answer_problems(answer, turn, set()) == []
    assert agent.answer_problems(answer, turn, {"c2"}) == ["call c2 (get_time): id used before"]


def answer(agent: ModuleType, *calls: tuple[str, str, str], content: str | None = None) -> Any:
    return agent.Answer("r", False, content, [agent.Call(*c) for c in calls], "stop", (10, 5))


@pytest.mark.parametrize(
    ("turn", "calls", "content", "problem"),
    [
        (("named", "add"), [("c1", "get_time", '{"city": "x"}')], None, "tool_choice named add"),
        (("required", None), [], "text", "tool_choice required answered without a tool call"),
        (("auto", None), [], None, "neither content nor a tool call"),
        (("auto", None), [("", "add", "{}")], None, "no id"),
        (("auto", None), [("c1", "rm_rf", "{}")], None, "not a declared tool"),
        (("auto", None), [("c1", "add", '{"a": 1')], None, "arguments are not JSON"),
        (("auto", None), [("c1", "add", "[1, 2]")], None, "not a JSON object"),
        (("auto", None), [("c1", "add", "{}"), ("c1", "add", "{}")], None, "id used before"),
    ],
)
def test_answer_problems_names_each_fault(agent, turn, calls, content, problem):
    choice, tool = turn
    found = agent.answer_problems(
        answer(agent, *calls, content=content), agent.Turn(1, choice, False, False, tool), set()
    )
    assert any(problem in p for p in found), found


def test_an_answer_without_usage_or_finish_reason_is_a_fault(agent):
    bad = answer(agent, content="hi")
    bad.usage, bad.finish_reason = None, None
    found = agent.answer_problems(bad, agent.Turn(1, "auto", False, False), set())
    assert found == ["finish_reason None", "no usage"]


def test_replays_compare_calls_by_name_and_parsed_arguments_not_ids_or_spacing(agent):
    first = answer(agent, ("c1", "add", '{"a": 1, "b": 2}'))
    same = answer(agent, ("c9", "add", '{"b":2,"a":1}'))
    assert agent.replay_problems(first, same) == []
    other = answer(agent, ("c9", "add", '{"a": 1, "b": 3}'))
    assert agent.replay_problems(first, other)[0].startswith("calls differ")
    fewer = answer(agent)
    fewer.content = "text"
    assert agent.replay_problems(first, fewer)[0].startswith("calls differ")
    texts = answer(agent, content="one"), answer(agent, content="two")
    assert agent.replay_problems(*texts) == ["content differs: 'one' vs 'two'"]
    tokens = answer(agent, content="one")
    tokens.usage = (10, 6)
    assert agent.replay_problems(texts[0], tokens) == ["usage differs: (10, 5) vs (10, 6)"]


def call_message(*ids: str) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": i, "type": "function", "function": {"name": "add", "arguments": "{}"}} for i in ids
        ],
    }


def result_message(call_id: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": "{}"}


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([call_message("a", "b"), result_message("a"), result_message("b")], None),
        ([call_message("a"), {"role": "user", "content": "?"}], "calls ['a'] have no result before it"),
        ([call_message("a")], "ends with calls ['a'] unanswered"),
        ([result_message("a")], "tool result for 'a', no such open call"),
        ([call_message("a"), result_message("b"), result_message("a")], "tool result for 'b'"),
        ([call_message("a"), result_message("a"), result_message("a")], "a second result for 'a'"),
        (
            [
                call_message("a"),
                result_message("a"),
                call_message("b"),
                result_message("a"),
                result_message("b"),
            ],
            "tool result for 'a', no such open call",
        ),
    ],
)
def test_pairing_problems_finds_every_call_without_its_result_and_every_stray_result(
    agent, messages, problem
):
    found = agent.pairing_problems([{"role": "user", "content": "task"}, *messages])
    if problem is None:
        assert found == []
    else:
        assert any(problem in p for p in found), found


def test_the_history_drops_whole_exchanges_oldest_first_and_keeps_the_latest_task(agent):
    history = agent.History("sys")
    history.add([{"role": "user", "content": "task one"}])
    history.trimmed(900)
    history.measured(400)  # the first request: system, tools and the task
    for index in range(12):
        history.add([call_message(f"c{index}"), result_message(f"c{index}")])
        messages = history.trimmed(600)
        assert agent.pairing_problems(messages) == []
        assert messages[:2] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "task one"}]
        expected = history.expected_prompt()
        assert expected is not None and expected <= 600
        history.measured(expected - 10)  # the server counts a little less than the estimate
    assert history.trims > 0
    # The newest exchange is always there; the oldest went first.
    ids = [m["tool_call_id"] for m in messages if m["role"] == "tool"]
    assert ids == sorted(ids, key=lambda i: int(i[1:])) and ids[-1] == "c11" and "c0" not in ids
    history.add([{"role": "assistant", "content": "done"}])
    history.add([{"role": "user", "content": "task two"}])
    messages = history.trimmed(500)
    assert messages[-1] == {"role": "user", "content": "task two"}
    assert {"role": "user", "content": "task one"} not in messages


def test_the_history_refuses_when_the_task_alone_does_not_fit(agent):
    history = agent.History("sys")
    history.add([{"role": "user", "content": "task"}])
    history.measured(700)
    with pytest.raises(RuntimeError, match="alone needs 700 tokens"):
        history.trimmed(600)


def test_the_turn_plan_mixes_every_choice_both_ways_and_replays_on_schedule(agent):
    rng = random.Random(0)
    turns = [agent.plan_turn(rng, i, 3) for i in range(1, 31)]
    assert {t.choice for t in turns} == {"required", "named", "auto"}
    assert {t.stream for t in turns} == {True, False}
    assert [t.index for t in turns if t.replay] == list(range(3, 31, 3))
    named = [t for t in turns if t.choice == "named"]
    assert all(t.tool in agent.TOOL_NAMES for t in named)
    assert named[0].tool_choice() == {"type": "function", "function": {"name": named[0].tool}}
    assert all(t.max_tokens == agent.TEXT_MAX_TOKENS for t in turns if t.choice == "auto")


def test_tools_answer_deterministically_from_their_arguments(agent):
    assert agent.run_tool("add", {"a": 2, "b": 40}) == {"sum": 42}
    weather = agent.run_tool("get_weather", {"city": "Oslo", "unit": "celsius"})
    assert weather == agent.run_tool("get_weather", {"unit": "celsius", "city": "Oslo"})
    assert weather["unit"] == "celsius" and -5 <= weather["temperature"] < 30
    assert ":" in agent.run_tool("get_time", {"city": "Rome"})["time"]
    with pytest.raises(ValueError):
        agent.run_tool("rm_rf", {})


# --- The ledger check ------------------------------------------------------------------------------------


def sent_and_rows(agent: ModuleType, reconcile: ModuleType) -> tuple[list[Any], list[Any]]:
    sent = [
        agent.Sent("agent-t-00000-m", "/v1/models", False, None, True),
        agent.Sent("agent-t-00001-p", "/v1/chat/completions", True, (600, 40), True),
        agent.Sent("agent-t-00001-r", "/v1/chat/completions", False, (600, 40), True),
    ]
    rows = [
        reconcile.Row("agent-t-00000-m", 200, "ok", False, "soak-agent", None, "/v1/models", 0, 0),
        reconcile.Row("agent-t-00001-p", 200, "ok", True, "soak-agent", "m", "/v1/chat/completions", 600, 40),
        reconcile.Row(
            "agent-t-00001-r", 200, "ok", False, "soak-agent", "m", "/v1/chat/completions", 600, 40
        ),
        reconcile.Row("other-1", 200, "ok", False, "someone", "m", "/v1/chat/completions", 1, 1),
    ]
    return sent, rows


def test_the_ledger_check_accepts_one_right_row_per_request(ledger):
    check_module, reconcile = ledger
    agent = importlib.import_module("soak_agent_loop")
    sent, rows = sent_and_rows(agent, reconcile)
    check = check_module.check_ledger(sent, rows, "soak-agent", "m")
    assert check.ok, check.to_json()
    assert (check.requests, check.rows, check.prompt_tokens, check.completion_tokens) == (3, 3, 1200, 80)


@pytest.mark.parametrize(
    ("fault", "field", "detail"),
    [
        ("drop", "lost", "agent-t-00001-r"),
        ("duplicate", "duplicated", "agent-t-00001-r"),
        ("foreign", "unknown", "agent-t-99999-p"),
        ("spill", "spilled", "agent-t-00001-r"),
        ("tokens", "mismatches", "ledger tokens 600+39, the SDK saw 600+40"),
        ("stream", "mismatches", "stream is True, not False"),
        ("status", "mismatches", "ledger says upstream_error/200"),
        ("model", "mismatches", "model is 'n', not 'm'"),
    ],
)
def test_the_ledger_check_catches_each_fault(ledger, fault, field, detail):
    import dataclasses

    check_module, reconcile = ledger
    agent = importlib.import_module("soak_agent_loop")
    sent, rows = sent_and_rows(agent, reconcile)
    row = rows[2]
    changes = {
        "tokens": {"completion_tokens": 39},
        "stream": {"stream": True},
        "status": {"outcome": "upstream_error"},
        "model": {"model": "n"},
        "spill": {"source": "spill"},
    }
    if fault == "drop":
        del rows[2]
    elif fault == "duplicate":
        rows.append(row)
    elif fault == "foreign":
        rows.append(dataclasses.replace(row, request_id="agent-t-99999-p"))
    else:
        rows[2] = dataclasses.replace(row, **changes[fault])
    check = check_module.check_ledger(sent, rows, "soak-agent", "m")
    assert not check.ok
    found = getattr(check, field)
    assert any(detail in (item if isinstance(item, str) else item[1]) for item in found), found


# --- The script's own verdicts ---------------------------------------------------------------------------


def test_a_run_that_missed_a_kind_of_turn_is_not_a_proof(agent, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    script = importlib.import_module("soak_agent")
    result = run_loop(agent, ScriptedServer(), calls=30)
    assert script.coverage_problems(result) == []
    result.by_choice.pop("auto")
    result.trims = 0
    result.replayed["streamed first"] = 0
    assert script.coverage_problems(result) == [
        "no turn with tool_choice auto",
        "no turn was replayed both ways (streamed first, and non-streamed first)",
        "the history was never trimmed",
    ]


def test_the_readme_block_is_replaced_between_its_markers_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    script = importlib.import_module("soak_agent")
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{script.README_START}\nold figures\n{script.README_END}\nafter\n")
    script.update_readme(readme, "new figures")
    assert readme.read_text() == f"before\n{script.README_START}\nnew figures\n{script.README_END}\nafter\n"
    readme.write_text("no markers\n")
    with pytest.raises(RuntimeError, match="no <!-- soak-agent:start -->"):
        script.update_readme(readme, "x")
    # The real README has the block, and it says the run had no protocol error.
    text = (ROOT / "README.md").read_text()
    block = " ".join(text.split(script.README_START, 1)[1].split(script.README_END, 1)[0].split())
    assert "**Protocol errors: 0.**" in block and "0 lost" in block and "1,000 tool calls" in block
