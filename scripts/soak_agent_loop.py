"""The agent of `make soak-agent`: one conversation, written with the official ``openai`` SDK and nothing
else, that chains tool calls through the gateway until it has made ``calls`` of them.

Each turn sends the history with three declared tools (``TOOLS``, ``strict: true``), thinking off, at
temperature 0, and a ``tool_choice`` drawn from ``SHARES``: ``required``, named (one tool by name) or
``auto``. Every tool call is run locally (``run_tool``) and its result goes back as a ``role: tool``
message carrying the call's ``tool_call_id``; a text answer ends the task, and the next user message
starts another. Half the turns stream (``stream_options.include_usage``), half do not. Before each
request the history is trimmed to the model's context (``History``: the served ``max_model_len`` read
from ``/v1/models``, token costs taken from the server's own ``usage`` figures), dropping whole
exchanges, oldest first, so that no tool result outlives its call.

The soak checks the protocol, not the model (``answer_problems``, ``replay_problems``,
``pairing_problems``); any failure is a protocol error and the run must have none:

- every tool call has an id (unique over the run), a declared tool's name, and ``arguments`` that parse
  as a JSON object (streamed: concatenated over the deltas of its index); a named ``tool_choice`` gets
  that tool, ``required`` gets a call;
- every turn ends with content or a tool call, a ``finish_reason``, and ``usage``;
- every ``replay_every``-th turn is sent again, the same greedy request the other way (streamed if it
  was not, and back): the calls must be the same (names and parsed arguments; ids differ), and so must the
  token counts, and the text where there is no call;
- every request's messages pair each call with exactly one result right after it, and each result with
  a call of the assistant message before it;
- an SDK error (HTTP status, connection, a stream that breaks) is a protocol error too.

Arguments that parse but break their tool's strict schema (``schema_problems``) are counted by
``finish_reason`` and sampled, not failed: that is vLLM's side of strict mode (the envelope's whitespace
can land in a string value, past its ``maxLength``), not the protocol through the gateway.

Why this gets real tool calls out of a random-weight model: ``tool_choice`` required / named make vLLM
constrain decoding to its tool-call parser's envelope (the ``qwen3_coder`` structural tag) and, for a
strict tool, to the tool's argument schema, so the model's tokens are real decoded tokens that vLLM's
parser turns into calls. ``auto`` leaves the choice to the model, which mostly writes text: those turns
are counted, not faked. A random model repeats whitespace inside the envelope until ``max_tokens``;
``frequency_penalty`` (each repeat of a token costs more) lets the call close. It proves the protocol
path (parsing, streaming assembly, id pairing, trimming, the ledger), nothing about a real model's choice
of tools over a long chain.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
import jsonschema
import openai

STRING = {"type": "string", "maxLength": 12}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": STRING, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
            "strict": True,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two whole numbers.",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": 0, "maximum": 999},
                    "b": {"type": "integer", "minimum": 0, "maximum": 999},
                },
                "required": ["a", "b"],
                "additionalProperties": False,
            },
            "strict": True,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The local time in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": STRING},
                "required": ["city"],
                "additionalProperties": False,
            },
            "strict": True,
        },
    },
]
TOOL_NAMES = tuple(tool["function"]["name"] for tool in TOOLS)
SYSTEM = "You are an agent. Answer the user's task; use the tools when they help, one step at a time."
TASKS = (
    "What is the weather in Paris, in celsius?",
    "Add 17 and 25, then add 8 to the result.",
    "What time is it in Tokyo, and is it warm there?",
    "Compare the weather in Oslo and Rome.",
)
SHARES = {"required": 0.4, "named": 0.4, "auto": 0.2}
"""How often each ``tool_choice`` is drawn for a turn."""
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
CALL_MAX_TOKENS = 64
"""A forced call: envelope, at most 12 characters a string, whitespace the random model adds."""
TEXT_MAX_TOKENS = 16
"""An ``auto`` turn, which the random model answers in text."""
FREQUENCY_PENALTY = 2.0
CONTEXT_MARGIN = 48
"""Tokens kept free below ``max_model_len`` besides ``max_tokens`` (rendering is not quite additive)."""


def run_tool(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """The tools' local, deterministic implementations (the result depends only on the arguments)."""
    digest = int.from_bytes(
        hashlib.sha256(json.dumps(arguments, sort_keys=True).encode()).digest()[:4], "big"
    )
    if name == "get_weather":
        celsius = digest % 35 - 5
        unit = arguments.get("unit")
        value = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
        return {"sky": ("clear", "cloudy", "rain", "snow")[digest % 4], "temperature": value, "unit": unit}
    if name == "add":
        return {"sum": int(arguments["a"]) + int(arguments["b"])}
    if name == "get_time":
        return {"time": f"{digest % 24:02d}:{digest // 24 % 60:02d}"}
    raise ValueError(f"no tool named {name!r}")


@dataclass(frozen=True)
class Call:
    """One tool call as the client got it."""

    id: str
    name: str
    arguments: str

    def parsed(self) -> Any:
        """The arguments as JSON (raises ``ValueError`` when they are not)."""
        return json.loads(self.arguments)


@dataclass
class Answer:
    """One chat completion as the client saw it, streamed or not, in one shape."""

    request_id: str
    stream: bool
    content: str | None = None
    calls: list[Call] = field(default_factory=list)
    finish_reason: str | None = None
    usage: tuple[int, int] | None = None
    chunks: int = 0
    elapsed_s: float = 0.0
    error: str | None = None


def answer_from_completion(request_id: str, completion: Any) -> Answer:
    """A non-streamed ``ChatCompletion``."""
    answer = Answer(request_id, stream=False)
    if completion.usage is not None:
        answer.usage = (completion.usage.prompt_tokens, completion.usage.completion_tokens)
    if len(completion.choices) != 1:
        answer.error = f"{len(completion.choices)} choices, asked for 1"
        return answer
    choice = completion.choices[0]
    answer.content = choice.message.content
    answer.finish_reason = choice.finish_reason
    for call in choice.message.tool_calls or []:
        function = getattr(call, "function", None)
        answer.calls.append(
            Call(call.id or "", function.name if function else "", function.arguments if function else "")
        )
    return answer


def answer_from_chunks(request_id: str, chunks: Iterable[Any]) -> Answer:
    """A streamed answer: content concatenated, each call assembled by its ``index`` (id and name from
    the first delta that has them, ``arguments`` concatenated over all of them), usage from the
    usage-only chunk."""
    answer = Answer(request_id, stream=True)
    parts: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        answer.chunks += 1
        if chunk.usage is not None:
            answer.usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        for choice in chunk.choices:
            if choice.index != 0:
                answer.error = f"a chunk for choice {choice.index}, asked for 1"
            delta = choice.delta
            if delta.content:
                parts.append(delta.content)
            for part in delta.tool_calls or []:
                call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                if part.id and not call["id"]:
                    call["id"] = part.id
                function = part.function
                if function is not None and function.name and not call["name"]:
                    call["name"] = function.name
                if function is not None and function.arguments:
                    call["arguments"] += function.arguments
            if choice.finish_reason:
                answer.finish_reason = choice.finish_reason
    answer.content = "".join(parts) if parts else None
    answer.calls = [Call(**calls[index]) for index in sorted(calls)]
    return answer


@dataclass(frozen=True)
class Turn:
    """What one turn asks for."""

    index: int
    choice: str
    """``required``, ``named`` or ``auto``."""
    stream: bool
    replay: bool
    tool: str | None = None
    """The named tool, for ``choice == "named"``."""

    def tool_choice(self) -> Any:
        if self.choice == "named":
            return {"type": "function", "function": {"name": self.tool}}
        return self.choice

    @property
    def max_tokens(self) -> int:
        return TEXT_MAX_TOKENS if self.choice == "auto" else CALL_MAX_TOKENS


def plan_turn(rng: random.Random, index: int, replay_every: int) -> Turn:
    """Turn ``index``: its ``tool_choice`` drawn with ``SHARES``, streamed or not at random, replayed
    when ``index`` is a multiple of ``replay_every`` (0: never)."""
    draw, choice = rng.random(), "auto"
    for name, share in SHARES.items():
        if draw < share:
            choice = name
            break
        draw -= share
    stream = rng.random() < 0.5
    tool = rng.choice(TOOL_NAMES)
    replay = replay_every > 0 and index % replay_every == 0
    return Turn(index, choice, stream, replay, tool if choice == "named" else None)


def answer_problems(answer: Answer, turn: Turn, seen_ids: set[str]) -> list[str]:
    """What is wrong with one answer at the protocol level (empty when nothing is)."""
    if answer.error is not None:
        return [answer.error]
    problems = []
    if not answer.content and not answer.calls:
        problems.append("the turn ended with neither content nor a tool call")
    if answer.finish_reason not in {"stop", "length", "tool_calls"}:
        problems.append(f"finish_reason {answer.finish_reason!r}")
    if answer.usage is None:
        problems.append("no usage" + (" chunk (stream_options.include_usage)" if answer.stream else ""))
    if turn.choice != "auto" and not answer.calls:
        problems.append(f"tool_choice {turn.choice} answered without a tool call")
    ids = set()
    for call in answer.calls:
        where = f"call {call.id or '<no id>'} ({call.name or '<no name>'})"
        if not call.id:
            problems.append(f"{where}: no id")
        elif call.id in seen_ids or call.id in ids:
            problems.append(f"{where}: id used before")
        ids.add(call.id)
        if call.name not in TOOL_NAMES:
            problems.append(f"{where}: not a declared tool")
        if turn.choice == "named" and call.name != turn.tool:
            problems.append(f"{where}: tool_choice named {turn.tool}")
        try:
            arguments = call.parsed()
        except ValueError as exc:
            problems.append(f"{where}: arguments are not JSON ({exc}): {call.arguments[:200]!r}")
            continue
        if not isinstance(arguments, dict):
            problems.append(f"{where}: arguments are not a JSON object: {call.arguments[:200]!r}")
    return problems


SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


def schema_problems(answer: Answer) -> list[tuple[str, bool]]:
    """Calls whose parsed arguments break their tool's JSON schema (every tool is ``strict: true``): one
    line per call, and whether only whitespace around string values breaks it (the values stripped
    would pass)."""
    problems = []
    for call in answer.calls:
        schema = SCHEMAS.get(call.name)
        try:
            arguments = call.parsed()
        except ValueError:
            continue  # answer_problems says so
        if schema is None or not isinstance(arguments, dict):
            continue
        validator = jsonschema.Draft202012Validator(schema)
        errors = [error.message for error in validator.iter_errors(arguments)]
        if errors:
            stripped = {k: v.strip() if isinstance(v, str) else v for k, v in arguments.items()}
            line = f"call {call.id} ({call.name}): arguments break its strict schema: {'; '.join(errors)}"
            problems.append((line, validator.is_valid(stripped)))
    return problems


def replay_problems(first: Answer, again: Answer) -> list[str]:
    """Where the same greedy request, sent once streamed and once not, came back different."""
    problems = []

    def shape(answer: Answer) -> list[tuple[str, Any]]:
        out = []
        for call in answer.calls:
            try:
                out.append((call.name, call.parsed()))
            except ValueError:
                out.append((call.name, call.arguments))
        return out

    if shape(first) != shape(again):
        problems.append(
            f"calls differ: {shape(first)} ({first.request_id}) vs {shape(again)} ({again.request_id})"
        )
    if first.usage != again.usage:
        problems.append(f"usage differs: {first.usage} vs {again.usage}")
    # With a call, vLLM streams the envelope's "<tool_call>\n" as content and sends none unstreamed (a
    # known vLLM quirk, tests/integration/test_sdk_openai.py): text is compared only without calls.
    if not first.calls and not again.calls and (first.content or "") != (again.content or ""):
        problems.append(f"content differs: {first.content!r} vs {again.content!r}")
    return problems


def pairing_problems(messages: list[dict[str, Any]]) -> list[str]:
    """Where a request's messages break the call/result pairing: every assistant tool call answered by
    exactly one ``role: tool`` message right after it (before any other message), and every tool message
    answering a call of the assistant message just before it."""
    problems = []
    open_ids: list[str] = []
    answered: set[str] = set()
    for position, message in enumerate(messages):
        role = message.get("role")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in open_ids:
                problems.append(f"message {position}: tool result for {call_id!r}, no such open call")
            elif call_id in answered:
                problems.append(f"message {position}: a second result for {call_id!r}")
            answered.add(str(call_id))
            continue
        missing = [call_id for call_id in open_ids if call_id not in answered]
        if missing:
            problems.append(f"message {position}: calls {missing} have no result before it")
        open_ids, answered = [], set()
        if role == "assistant":
            open_ids = [call["id"] for call in message.get("tool_calls") or []]
    missing = [call_id for call_id in open_ids if call_id not in answered]
    if missing:
        problems.append(f"the request ends with calls {missing} unanswered")
    return problems


def message_estimate(message: dict[str, Any]) -> int:
    """An upper bound of a message's tokens before the server has counted it: its JSON's bytes (a
    byte-level BPE token covers at least one byte) plus the template's own tokens."""
    return len(json.dumps(message).encode()) + 16


@dataclass
class Unit:
    """Messages that go or stay together: a user message; an assistant text answer; an assistant's tool
    calls with their results."""

    messages: list[dict[str, Any]]
    cost: int
    """Tokens it adds to a prompt: an estimate until the server's usage measured it."""
    measured: bool = False


class History:
    """The conversation, trimmed to a token budget.

    Costs come from the server: after each request ``measured(prompt_tokens)`` learns the exact prompt
    size, and the units added since the last request get the difference as their cost. Before a request,
    ``trimmed(budget)`` drops the oldest units (never the latest user message) until the last measured
    prompt, less what was dropped, plus the estimates of what is new fits.
    """

    def __init__(self, system: str) -> None:
        self.system = {"role": "system", "content": system}
        self.units: list[Unit] = []
        self.last_prompt: int | None = None
        self._new: list[Unit] = []
        self._dropped_since = 0
        self.trims = 0
        self.dropped_units = 0

    def add(self, messages: list[dict[str, Any]]) -> None:
        unit = Unit(messages, sum(message_estimate(m) for m in messages))
        self.units.append(unit)
        self._new.append(unit)

    def expected_prompt(self) -> int | None:
        """What the next request's prompt will be, at most, or None before the first measure."""
        if self.last_prompt is None:
            return None
        return self.last_prompt - self._dropped_since + sum(u.cost for u in self._new)

    def trimmed(self, budget: int) -> list[dict[str, Any]]:
        """The messages to send, after dropping the oldest units until the prompt fits ``budget``."""
        latest_user = max(
            (i for i, u in enumerate(self.units) if u.messages[0]["role"] == "user"), default=-1
        )
        dropped = False
        while (expected := self.expected_prompt()) is not None and expected > budget:
            victim = next((i for i in range(len(self.units)) if i != latest_user), None)
            if victim is None:
                raise RuntimeError(f"the latest user message alone needs {expected} tokens, over {budget}")
            unit = self.units.pop(victim)
            latest_user -= victim < latest_user
            if unit in self._new:
                self._new.remove(unit)
            elif unit.measured:
                self._dropped_since += unit.cost
            # An unmeasured old unit (the first request's) counts 0: the estimate stays high, not low.
            self.dropped_units += 1
            dropped = True
        self.trims += dropped
        return [self.system, *(m for u in self.units for m in u.messages)]

    def measured(self, prompt_tokens: int) -> None:
        """The server counted the prompt just sent: the new units' costs follow from it."""
        if self.last_prompt is not None and self._new:
            delta = prompt_tokens - (self.last_prompt - self._dropped_since)
            estimate = sum(u.cost for u in self._new) or 1
            for unit in self._new:
                unit.cost, unit.measured = max(0, round(delta * unit.cost / estimate)), True
        self.last_prompt, self._new, self._dropped_since = prompt_tokens, [], 0


@dataclass
class Sent:
    """One request the agent made (for the ledger reconcile)."""

    request_id: str
    route: str
    stream: bool
    usage: tuple[int, int] | None
    ok: bool


@dataclass
class Problem:
    """A protocol error."""

    turn: int
    request_id: str
    problem: str

    def to_json(self) -> dict[str, Any]:
        return {"turn": self.turn, "request_id": self.request_id, "problem": self.problem}


@dataclass
class LoopResult:
    """What the agent did and saw."""

    calls: int = 0
    turns: int = 0
    replays: int = 0
    sent: list[Sent] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    elapsed_s: float = 0.0
    max_model_len: int = 0
    by_choice: dict[str, Counter[str]] = field(default_factory=dict)
    """Per ``tool_choice``: turns, streamed turns, calls, turns answered with a call / with text only."""
    calls_by_tool: Counter[str] = field(default_factory=Counter)
    finish_reasons: Counter[str] = field(default_factory=Counter)
    prompt_tokens: list[int] = field(default_factory=list)
    completion_tokens: int = 0
    history_messages: list[int] = field(default_factory=list)
    trims: int = 0
    dropped_units: int = 0
    tasks: int = 0
    results_fed_back: int = 0
    outside_schema: Counter[str] = field(default_factory=Counter)
    """Calls whose arguments break their tool's strict schema, by their answer's ``finish_reason``."""
    outside_schema_by_whitespace: int = 0
    """Of those, calls that only whitespace around a string value breaks."""
    outside_schema_samples: list[str] = field(default_factory=list)
    replayed: Counter[str] = field(default_factory=Counter)
    """Replays by the first request's mode: ``streamed first`` / ``non-streamed first``."""

    @property
    def replays_both_ways(self) -> bool:
        return self.replayed["streamed first"] > 0 and self.replayed["non-streamed first"] > 0

    def to_json(self) -> dict[str, Any]:
        prompts = self.prompt_tokens or [0]
        return {
            "tool_calls": self.calls,
            "turns": self.turns,
            "replays": self.replays,
            "replays_by_first_mode": dict(self.replayed),
            "results_fed_back": self.results_fed_back,
            "calls_outside_strict_schema": {
                "by_finish_reason": dict(self.outside_schema.most_common()),
                "only_whitespace_around_a_string": self.outside_schema_by_whitespace,
                "samples": self.outside_schema_samples,
            },
            "requests": len(self.sent),
            "protocol_errors": len(self.problems),
            "problems": [p.to_json() for p in self.problems[:50]],
            "elapsed_s": round(self.elapsed_s, 2),
            "tool_calls_per_s": round(self.calls / self.elapsed_s, 3) if self.elapsed_s else None,
            "by_tool_choice": {k: dict(v) for k, v in sorted(self.by_choice.items())},
            "calls_by_tool": dict(self.calls_by_tool.most_common()),
            "finish_reasons": dict(self.finish_reasons.most_common()),
            "tokens": {
                "prompt": sum(s.usage[0] for s in self.sent if s.usage),
                "completion": sum(s.usage[1] for s in self.sent if s.usage),
                "prompt_per_turn_min": min(prompts),
                "prompt_per_turn_max": max(prompts),
                "prompt_per_turn_mean": round(sum(prompts) / len(prompts), 1),
            },
            "history": {
                "max_model_len": self.max_model_len,
                "messages_min": min(self.history_messages or [0]),
                "messages_max": max(self.history_messages or [0]),
                "trims": self.trims,
                "units_dropped": self.dropped_units,
                "user_tasks": self.tasks,
            },
        }


class AgentLoop:
    """The agent: ``run()`` chains turns until ``calls`` tool calls were made (or ``max_turns``).

    Args:
        client: an ``openai.OpenAI`` pointed at the gateway.
        model: the served model id.
        calls: tool calls to make.
        run_id: goes into every ``x-request-id`` (``agent-<run_id>-<turn>-<p|r|m>``).
        seed: of the turn plan.
        replay_every: every n-th turn is replayed the other way (0: none).
        max_turns: a bound, so that a model that stops calling cannot loop forever.
        log_every: print a progress line every so many calls (0: quiet).
    """

    def __init__(
        self,
        client: openai.OpenAI,
        model: str,
        calls: int,
        run_id: str,
        seed: int = 0,
        replay_every: int = 10,
        max_turns: int | None = None,
        log_every: int = 0,
    ) -> None:
        self.client = client
        self.model = model
        self.calls = calls
        self.run_id = run_id
        self.rng = random.Random(seed)
        self.replay_every = replay_every
        self.max_turns = max_turns if max_turns is not None else calls * 3 + 10
        self.log_every = log_every
        self.result = LoopResult()
        self.seen_ids: set[str] = set()
        self.history = History(SYSTEM)

    def _rid(self, turn: int, kind: str) -> str:
        return f"agent-{self.run_id}-{turn:05d}-{kind}"

    def _context(self) -> int:
        """The served ``max_model_len`` (vLLM's field in ``/v1/models``, through the gateway)."""
        request_id = self._rid(0, "m")
        try:
            models = self.client.models.list(extra_headers={"x-request-id": request_id})
        except openai.OpenAIError as exc:
            self.result.sent.append(Sent(request_id, "/v1/models", False, None, False))
            raise RuntimeError(f"GET /v1/models failed: {exc}") from exc
        self.result.sent.append(Sent(request_id, "/v1/models", False, None, True))
        for model in models.data:
            if model.id == self.model:
                length = (model.model_extra or {}).get("max_model_len")
                if isinstance(length, int):
                    return length
        raise RuntimeError(f"/v1/models names no max_model_len for {self.model}")

    def _ask(self, turn: Turn, messages: list[dict[str, Any]], stream: bool, kind: str) -> Answer:
        """Send one chat completion; SDK errors come back as an ``Answer`` with ``error`` set."""
        request_id = self._rid(turn.index, kind)
        asked: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "tools": TOOLS,
            "tool_choice": turn.tool_choice(),
            "max_tokens": turn.max_tokens,
            "temperature": 0,
            "frequency_penalty": FREQUENCY_PENALTY,
            "extra_body": NO_THINKING,
            "extra_headers": {"x-request-id": request_id},
        }
        start = time.monotonic()
        try:
            if stream:
                chunks = self.client.chat.completions.create(
                    **asked, stream=True, stream_options={"include_usage": True}
                )
                answer = answer_from_chunks(request_id, chunks)
            else:
                answer = answer_from_completion(request_id, self.client.chat.completions.create(**asked))
        except (openai.OpenAIError, httpx.HTTPError, ValueError) as exc:  # ValueError: a chunk not JSON
            answer = Answer(request_id, stream, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        answer.elapsed_s = time.monotonic() - start
        self.result.sent.append(
            Sent(request_id, "/v1/chat/completions", stream, answer.usage, answer.error is None)
        )
        return answer

    def _problem(self, turn: int, request_id: str, problem: str) -> None:
        self.result.problems.append(Problem(turn, request_id, problem))
        print(f"PROTOCOL ERROR turn {turn} ({request_id}): {problem}", flush=True)

    def _new_task(self) -> None:
        self.history.add([{"role": "user", "content": TASKS[self.result.tasks % len(TASKS)]}])
        self.result.tasks += 1

    def run(self) -> LoopResult:
        result = self.result
        start = time.monotonic()
        result.max_model_len = self._context()
        self._new_task()
        index = 0
        next_log = self.log_every
        while result.calls < self.calls and index < self.max_turns:
            index += 1
            turn = plan_turn(self.rng, index, self.replay_every)
            messages = self.history.trimmed(result.max_model_len - turn.max_tokens - CONTEXT_MARGIN)
            result.history_messages.append(len(messages))
            for problem in pairing_problems(messages):
                self._problem(index, self._rid(index, "p"), f"outgoing messages: {problem}")
            answer = self._ask(turn, messages, turn.stream, "p")
            problems = answer_problems(answer, turn, self.seen_ids)
            if outside := schema_problems(answer):
                result.outside_schema[str(answer.finish_reason)] += len(outside)
                result.outside_schema_by_whitespace += sum(whitespace for _, whitespace in outside)
                lines = [line for line, _ in outside]
                result.outside_schema_samples += lines[: 10 - len(result.outside_schema_samples)]
            if turn.replay and answer.error is None:
                again = self._ask(turn, messages, not turn.stream, "r")
                result.replays += 1
                result.replayed["streamed first" if turn.stream else "non-streamed first"] += 1
                problems += [
                    f"replay: {p}" for p in answer_problems(again, turn, self.seen_ids | self._ids(answer))
                ]
                problems += replay_problems(answer, again)
            for problem in problems:
                self._problem(index, answer.request_id, problem)
            self._count(turn, answer)
            if answer.error is not None:
                break  # nothing to build the next turn on (and the run has failed)
            if answer.usage is not None:
                self.history.measured(answer.usage[0])
            self._advance(answer)
            if self.log_every and result.calls >= next_log:
                next_log += self.log_every
                self._progress(index, start)
        result.turns = index
        result.trims, result.dropped_units = self.history.trims, self.history.dropped_units
        result.elapsed_s = time.monotonic() - start
        return result

    @staticmethod
    def _ids(answer: Answer) -> set[str]:
        return {call.id for call in answer.calls}

    def _count(self, turn: Turn, answer: Answer) -> None:
        result = self.result
        counts = result.by_choice.setdefault(turn.choice, Counter())
        counts["turns"] += 1
        counts["streamed"] += turn.stream
        counts["calls"] += len(answer.calls)
        counts["answered_with_call" if answer.calls else "answered_with_text"] += answer.error is None
        result.calls += len(answer.calls)
        result.calls_by_tool.update(call.name for call in answer.calls)
        result.finish_reasons[str(answer.finish_reason)] += 1
        if answer.usage is not None:
            result.prompt_tokens.append(answer.usage[0])
            result.completion_tokens += answer.usage[1]

    def _advance(self, answer: Answer) -> None:
        """Append the answer, run its calls and feed their results back; a text answer ends the task."""
        self.seen_ids |= self._ids(answer)
        if not answer.calls:
            self.history.add([{"role": "assistant", "content": answer.content or ""}])
            self._new_task()
            return
        assistant: dict[str, Any] = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in answer.calls
            ],
        }
        results = []
        for call in answer.calls:
            try:
                output: Any = run_tool(call.name, call.parsed())
            except (ValueError, KeyError, TypeError) as exc:
                output = {"error": str(exc)}  # outside its schema: the model is told, as an agent would
            results.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(output)})
        self.history.add([assistant, *results])
        self.result.results_fed_back += len(results)

    def _progress(self, turns: int, start: float) -> None:
        result = self.result
        elapsed = time.monotonic() - start
        print(
            f"  {result.calls} tool calls in {turns} turns ({len(result.sent)} requests), "
            f"{elapsed:.0f} s ({result.calls / elapsed:.2f} calls/s), protocol errors {len(result.problems)}",
            flush=True,
        )
