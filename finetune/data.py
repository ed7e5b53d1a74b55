"""Load and validate a JSONL file of chat conversations for fine-tuning (no model, no tokenizer).

One JSON object per line, in the OpenAI chat format::

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
     "tools": [{"type": "function", "function": {"name": "...", "parameters": {...}}}]}

Every problem in the file is collected, each as ``PATH:LINE: message``, before :class:`DataError` is
raised, so one run of ``make validate-data`` shows them all and nothing trains on a half-valid file.

What comes out (:class:`Sample`) is normalised so the tokenizer's chat template sees one shape:

* content is a string (a list of ``{"type": "text"}`` parts is joined with no separator, as the chat
  template does when vLLM serves the same list); ``""`` only for an assistant message with tool calls;
* thinking lives in ``reasoning_content``, never in content: ``<think>r</think>answer`` (or just
  ``r</think>answer``) becomes ``reasoning_content="r"`` and ``content="answer"``;
* tool calls are ``{"id": str | None, "type": "function", "function": {"name": str, "arguments": dict}}``
  with arguments given as a JSON string parsed into an object;
* message dicts hold only ``role``, ``content`` and, where given, ``name``, ``tool_calls``,
  ``tool_call_id``, ``reasoning_content``; an empty ``tools`` list becomes None.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
"""The message roles a conversation may use."""

TOP_LEVEL_KEYS = ("messages", "tools")
"""The keys a line's object may have; anything else (a typo such as ``mesages``) is an error."""

MESSAGE_KEYS = ("role", "content", "name", "tool_call_id", "tool_calls", "reasoning_content")
"""The keys a message may have; ``tool_calls``/``reasoning_content`` only on assistant messages and
``tool_call_id`` only on tool messages."""

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_ROLE_ONLY_KEYS = MappingProxyType(
    {"tool_calls": "assistant", "reasoning_content": "assistant", "tool_call_id": "tool"}
)
_CALL_KEYS = ("id", "type", "function")
_FUNCTION_KEYS = ("name", "arguments")
_NO_MATCH = "tool message without a matching call"


@dataclass(frozen=True)
class Sample:
    """One validated, normalised conversation.

    Attributes:
        line: The 1-based line of the conversation in its JSONL file.
        messages: The normalised messages (see the module docstring).
        tools: The tool definitions given with the conversation, or None when there were none.
    """

    line: int
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None


class DataError(Exception):
    """A training data file that cannot be used; nothing should train on it.

    ``str()`` lists every problem, one per line, then a hint line saying what to do.

    Attributes:
        problems: Every problem found, each ``PATH:LINE: message`` (``PATH: message`` for a problem
            with the whole file, such as a missing or empty file).
        path: The data file, when known.
        hint: The closing line of ``str()``.
    """

    def __init__(self, problems: list[str], path: Path | None = None, hint: str | None = None) -> None:
        """Build the error.

        Args:
            problems: Every problem, each already prefixed with its ``PATH:LINE:``.
            path: The data file; used in the default hint.
            hint: The closing line; by default it names ``make validate-data DATA=PATH``.
        """
        self.problems = list(problems)
        self.path = path
        if hint is None:
            data = path if path is not None else "PATH"
            hint = f"Fix these lines and run `make validate-data DATA={data}` again; nothing was trained."
        self.hint = hint
        super().__init__("\n".join([*self.problems, hint]))

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle with the original arguments (for worker processes that re-raise it)."""
        return (type(self), (self.problems, self.path, self.hint))


def load_samples(path: Path) -> list[Sample]:
    """Read, validate and normalise every conversation in a JSONL file; raise on any problem.

    Blank lines are skipped. Every line is checked, and every problem of every line is collected,
    before anything is raised.

    Args:
        path: The JSONL file: one ``{"messages": [...], "tools": [...]}`` object per line.

    Returns:
        The conversations in file order (never empty).

    Raises:
        DataError: The file is missing, unreadable or empty (one problem), or any line has problems
            (all of them, each with its line number). Two lines that normalise to the same
            conversation are a problem on the later line.
    """
    samples, problems = read_samples(path)
    if problems:
        raise DataError(problems, path)
    return samples


def read_samples(path: Path) -> tuple[list[Sample], list[str]]:
    """Like :func:`load_samples`, but return the good conversations and the problems of the others.

    For callers that check more (lengths after tokenisation, train/eval overlap) and report every
    problem of every file together.

    Returns:
        ``(samples without problems, in file order; every problem as PATH:LINE: message)``.

    Raises:
        DataError: only when the file itself is missing, unreadable or empty.
    """
    path = Path(path)
    lines = _read_lines(path)
    problems: list[str] = []
    samples: list[Sample] = []
    first_line_of: dict[str, int] = {}
    for number, text in lines:
        if text is None:
            problems.append(f"{path}:{number}: not valid UTF-8 text")
            continue
        sample, line_problems = _parse_sample(number, text)
        if sample is not None:
            key = conversation_key(sample)
            if key in first_line_of:
                line_problems.append(f"duplicate of line {first_line_of[key]} (the same conversation)")
            elif not line_problems:
                first_line_of[key] = number
                samples.append(sample)
        problems.extend(f"{path}:{number}: {problem}" for problem in line_problems)
    return samples, problems


def conversation_key(sample: Sample) -> str:
    """A canonical text of a normalised conversation: equal keys mean the same training example."""
    return json.dumps(
        {"messages": sample.messages, "tools": sample.tools},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )


def split(samples: list[Sample], eval_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split samples into train and eval sets, the same way for the same seed.

    Eval gets ``round(len(samples) * eval_fraction)`` samples (Python's ``round``), at least 1 when
    ``eval_fraction > 0`` and there are at least 2 samples, and never all of them: train always keeps
    at least one. A single sample therefore always goes to train (``([sample], [])``), even with
    ``eval_fraction > 0``; callers that need an eval set check for an empty one. Which samples go to
    eval is drawn with ``random.Random(seed)``; both lists keep the input order.

    Args:
        samples: The conversations, e.g. from :func:`load_samples`; not modified.
        eval_fraction: The share for eval, in ``[0, 1)``.
        seed: The random seed.

    Returns:
        ``(train, eval)``.

    Raises:
        ValueError: ``samples`` is empty or ``eval_fraction`` is outside ``[0, 1)``.
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1) (0 means no eval set), got {eval_fraction!r}")
    n = len(samples)
    if n == 0:
        raise ValueError("cannot split an empty list of samples: there is nothing to train on")
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n >= 2:
        n_eval = max(n_eval, 1)
    n_eval = min(n_eval, n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    chosen = set(order[:n_eval])
    train = [s for i, s in enumerate(samples) if i not in chosen]
    evals = [s for i, s in enumerate(samples) if i in chosen]
    return train, evals


def _read_lines(path: Path) -> list[tuple[int, str | None]]:
    """The non-blank lines of ``path`` as ``(1-based number, text)``; text is None for a non-UTF-8 line.

    Raises:
        DataError: The file is missing, unreadable or has no non-blank line (one problem).
    """
    hint = f"Check the path and run `make validate-data DATA={path}` again; nothing was trained."
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError([f"{path}: no such file"], path, hint) from None
    except IsADirectoryError:
        raise DataError([f"{path}: is a directory, not a JSONL file"], path, hint) from None
    except OSError as exc:
        raise DataError([f"{path}: cannot read the file: {exc.strerror or exc}"], path, hint) from None
    lines: list[tuple[int, str | None]] = []
    for number, chunk in enumerate(raw.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError:
            lines.append((number, None))
            continue
        if text.strip():
            lines.append((number, text))
    if not lines:
        raise DataError([f"{path}: the file is empty (expected one JSON conversation per line)"], path, hint)
    return lines


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json`` object hook: a key given twice would silently keep only its last value."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r} in an object")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    """``json`` constant hook: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


def _loads(text: str) -> tuple[Any, str | None]:
    """Parse strict JSON; return ``(value, None)`` or ``(None, why it is invalid)``."""
    try:
        return json.loads(text, object_pairs_hook=_strict_object, parse_constant=_reject_constant), None
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON at column {exc.colno}: {exc.msg}"
    except ValueError as exc:
        return None, f"invalid JSON: {exc}"
    except RecursionError:
        return None, "invalid JSON: nested too deeply"


def _kind(value: Any) -> str:
    """A JSON type name with its article, for messages ("got a list")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_name(value: Any) -> bool:
    """Whether ``value`` is a non-empty, non-blank string."""
    return isinstance(value, str) and bool(value.strip())


def _parse_sample(number: int, text: str) -> tuple[Sample | None, list[str]]:
    """Check one line; return the sample (None when it has problems) and its problems (no prefix)."""
    obj, error = _loads(text)
    if error is not None:
        return None, [error]
    if not isinstance(obj, dict):
        return None, [f'expected a JSON object with "messages", got {_kind(obj)}']
    problems: list[str] = []
    for key in obj:
        if key not in TOP_LEVEL_KEYS:
            problems.append(f"unknown key {key!r} (allowed: {', '.join(TOP_LEVEL_KEYS)})")
    tools = _check_tools(obj.get("tools"), problems)
    messages: list[dict[str, Any]] = []
    if "messages" not in obj:
        problems.append('"messages" is missing')
    elif not isinstance(obj["messages"], list) or not obj["messages"]:
        problems.append(f'"messages" must be a non-empty list of messages, got {_describe(obj["messages"])}')
    else:
        messages = _Conversation().check(obj["messages"], problems)
    if problems:
        return None, problems
    return Sample(line=number, messages=messages, tools=tools), problems


def _describe(value: Any) -> str:
    """Like :func:`_kind`, but says "an empty list" for ``[]``."""
    return "an empty list" if value == [] else _kind(value)


def _check_tools(tools: Any, problems: list[str]) -> list[dict[str, Any]] | None:
    """Validate the top-level ``tools``; return them (None when absent or empty)."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        problems.append(
            f'"tools" must be a list of {{"type": "function", "function": {{...}}}}, got {_kind(tools)}'
        )
        return None
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            problems.append(f"{where}: expected an object, got {_kind(tool)}")
            continue
        if tool.get("type") != "function":
            problems.append(f'{where}: "type" must be "function", got {tool.get("type")!r}')
        function = tool.get("function")
        if not isinstance(function, dict):
            problems.append(f'{where}: "function" must be an object with a "name", got {_kind(function)}')
        elif not _is_name(function.get("name")):
            problems.append(f'{where}: "function.name" must be a non-empty string')
    return tools or None


def _content_text(content: Any, where: str, problems: list[str]) -> tuple[str | None, bool]:
    """The text of a message's content: ``(text or None when absent, whether it was valid)``."""
    if content is None:
        return None, True
    if isinstance(content, str):
        return content, True
    if not isinstance(content, list):
        problems.append(f"{where}: content must be a string or a list of text parts, got {_kind(content)}")
        return None, False
    texts: list[str] = []
    valid = True
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "text":
            problems.append(f'{where}: content[{j}]: a text part needs "text" as a string')
            valid = False
        else:
            got = f"a part of type {kind!r}" if isinstance(kind, str) else _kind(part)
            problems.append(
                f'{where}: content[{j}] is {got}; only {{"type": "text", "text": ...}} parts are '
                "allowed (this kit trains text only)"
            )
            valid = False
    return ("".join(texts), True) if valid else (None, False)


def _split_thinking(text: str) -> tuple[str | None, str, str | None]:
    """Move ``<think>...</think>`` out of an assistant content.

    Returns:
        ``(reasoning or None when there is no thinking, content, problem or None)``.
    """
    if THINK_CLOSE not in text:
        if THINK_OPEN in text:
            return None, text, f"unterminated thinking: {THINK_OPEN} without {THINK_CLOSE}"
        return None, text, None
    before, after = text.split(THINK_CLOSE, 1)
    if THINK_CLOSE in after or THINK_OPEN in after:
        return (
            None,
            text,
            f"more than one thinking block: only one {THINK_OPEN}...{THINK_CLOSE}, at the start",
        )
    reasoning = before.lstrip()
    if reasoning.startswith(THINK_OPEN):
        reasoning = reasoning[len(THINK_OPEN) :]
    if THINK_OPEN in reasoning:
        return None, text, f"{THINK_OPEN} must open the content (text before it would be lost)"
    return reasoning.strip(), after.lstrip("\n"), None


@dataclass
class _Conversation:
    """Per-conversation state for matching tool messages to tool calls."""

    ids: dict[str, int] = field(default_factory=dict)
    """Every tool call id seen so far, with the index of the message that made the call."""
    pending: list[str | None] = field(default_factory=list)
    """The unanswered calls (their ids, None for id-less calls) of the latest assistant tool-call turn."""
    answered: set[str] = field(default_factory=set)
    """Ids of calls already answered."""
    in_tool_turn: bool = False
    """Whether the previous message was an assistant message with tool calls, or a tool message after one."""

    def check(self, raw_messages: list[Any], problems: list[str]) -> list[dict[str, Any]]:
        """Validate and normalise all messages; append problems; return the normalised messages."""
        messages: list[dict[str, Any]] = []
        roles: list[Any] = []
        for index, raw in enumerate(raw_messages):
            message = self._message(index, raw, problems)
            roles.append(raw.get("role") if isinstance(raw, dict) else None)
            if message is not None:
                messages.append(message)
        last = roles[-1]
        if last != "assistant" and last in ROLES:
            problems.append(
                f"the conversation must end with an assistant message (the turn to learn), ends with {last!r}"
            )
        if "user" not in roles:
            problems.append("the conversation has no user message")
        return messages

    def _message(self, index: int, raw: Any, problems: list[str]) -> dict[str, Any] | None:
        """Validate one message; return it normalised (None when it is unusable)."""
        where = f"messages[{index}]"
        allowed_roles = ", ".join(ROLES)
        if not isinstance(raw, dict):
            problems.append(f"{where}: expected a message object, got {_kind(raw)}")
            return None
        if "role" not in raw:
            problems.append(f'{where}: "role" is missing (allowed: {allowed_roles})')
            return None
        role = raw["role"]
        if role not in ROLES:
            problems.append(f"{where}: unknown role {role!r} (allowed: {allowed_roles})")
            return None
        where = f"{where} ({role})"
        count = len(problems)
        for key in raw:
            if key not in MESSAGE_KEYS:
                problems.append(f"{where}: unknown key {key!r} (allowed: {', '.join(MESSAGE_KEYS)})")
            elif key in _ROLE_ONLY_KEYS and _ROLE_ONLY_KEYS[key] != role and raw[key] is not None:
                problems.append(f"{where}: {key!r} is only allowed on {_ROLE_ONLY_KEYS[key]} messages")
        if role == "system" and index != 0:
            problems.append(f"{where}: a system message is only allowed as the first message")
        message: dict[str, Any] = {"role": role, "content": ""}
        name = raw.get("name")
        if name is not None:
            if _is_name(name):
                message["name"] = name
            else:
                problems.append(f'{where}: "name" must be a non-empty string')
        text, valid = _content_text(raw.get("content"), where, problems)
        thought = False
        if role == "assistant":
            text, thought = self._assistant(index, raw, text, message, where, problems)
        else:
            if text is not None and (THINK_OPEN in text or THINK_CLOSE in text):
                problems.append(f"{where}: {THINK_OPEN}/{THINK_CLOSE} are only allowed in assistant content")
            if role == "tool":
                self._tool(raw, message, where, problems)
            else:
                self.in_tool_turn = False
        if text is not None and text.strip():
            message["content"] = text
        elif valid and "tool_calls" not in message:
            empty = "content is missing" if text is None else "content is empty"
            problems.append(f"{where}: {empty}" + (f" after {THINK_CLOSE}" if thought else ""))
        return message if len(problems) == count else None

    def _assistant(
        self,
        index: int,
        raw: dict[str, Any],
        text: str | None,
        message: dict[str, Any],
        where: str,
        problems: list[str],
    ) -> tuple[str | None, bool]:
        """Check an assistant message's tool calls and thinking; fill ``message``.

        Returns:
            ``(content, whether thinking was split out of it)``.
        """
        raw_calls = raw.get("tool_calls")
        if raw_calls is not None and not isinstance(raw_calls, list):
            problems.append(f'{where}: "tool_calls" must be a list, got {_kind(raw_calls)}')
        elif raw_calls:
            calls = [self._call(index, j, call, where, problems) for j, call in enumerate(raw_calls)]
            message["tool_calls"] = calls
            self.pending = [
                c.get("id") if isinstance(c, dict) and isinstance(c.get("id"), str) else None
                for c in raw_calls
            ]
            self.in_tool_turn = True
        else:
            self.in_tool_turn = False
        reasoning = raw.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            problems.append(f'{where}: "reasoning_content" must be a string, got {_kind(reasoning)}')
            reasoning = None
        if reasoning is not None and (THINK_OPEN in reasoning or THINK_CLOSE in reasoning):
            problems.append(f'{where}: "reasoning_content" must not contain {THINK_OPEN} or {THINK_CLOSE}')
        split_out = False
        if text is not None:
            thought, text, problem = _split_thinking(text)
            if problem is not None:
                problems.append(f"{where}: {problem}")
            elif thought is not None:
                split_out = True
                if reasoning is not None:
                    problems.append(
                        f'{where}: thinking given twice: as "reasoning_content" and before {THINK_CLOSE}'
                    )
                reasoning = thought
        if reasoning is not None and reasoning.strip():
            message["reasoning_content"] = reasoning.strip()
        return text, split_out

    def _call(self, index: int, j: int, call: Any, where: str, problems: list[str]) -> dict[str, Any]:
        """Check one tool call; return it normalised (contents are only meaningful without problems)."""
        where = f"{where}: tool_calls[{j}]"
        if not isinstance(call, dict):
            problems.append(f"{where}: expected an object, got {_kind(call)}")
            return {}
        for key in call:
            if key not in _CALL_KEYS:
                problems.append(f"{where}: unknown key {key!r} (allowed: {', '.join(_CALL_KEYS)})")
        if call.get("type", "function") != "function":
            problems.append(f'{where}: "type" must be "function", got {call["type"]!r}')
        call_id = call.get("id")
        if call_id is not None:
            if not _is_name(call_id):
                problems.append(f'{where}: "id" must be a non-empty string when given')
            elif call_id in self.ids:
                problems.append(
                    f"{where}: duplicate tool call id {call_id!r} (used in messages[{self.ids[call_id]}])"
                )
            else:
                self.ids[call_id] = index
        function = call.get("function")
        if not isinstance(function, dict):
            problems.append(f'{where}: "function" must be an object with "name" and "arguments"')
            return {}
        for key in function:
            if key not in _FUNCTION_KEYS:
                problems.append(f"{where}: unknown key 'function.{key}' (allowed: name, arguments)")
        name = function.get("name")
        if not _is_name(name):
            problems.append(f'{where}: "function.name" must be a non-empty string')
        arguments = function.get("arguments")
        if "arguments" not in function:
            problems.append(f'{where}: "function.arguments" is missing (use {{}} for no arguments)')
        elif isinstance(arguments, str):
            arguments, error = _loads(arguments)
            if error is not None:
                problems.append(f'{where}: "function.arguments" is {error}')
            elif not isinstance(arguments, dict):
                problems.append(
                    f'{where}: "function.arguments" must be a JSON object, got {_kind(arguments)}'
                )
        elif not isinstance(arguments, dict):
            problems.append(
                f'{where}: "function.arguments" must be an object or a JSON string, got {_kind(arguments)}'
            )
        return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}

    def _tool(self, raw: dict[str, Any], message: dict[str, Any], where: str, problems: list[str]) -> None:
        """Match a tool message to an unanswered call of the assistant message before it."""
        call_id = raw.get("tool_call_id")
        if call_id is not None and not _is_name(call_id):
            problems.append(f'{where}: "tool_call_id" must be a non-empty string when given')
            call_id = None
        elif call_id is not None:
            message["tool_call_id"] = call_id
        if not self.in_tool_turn:
            problems.append(
                f"{where}: {_NO_MATCH}: a tool message must follow an assistant message with tool_calls "
                "(or another tool message after one)"
            )
            return
        if call_id is None:
            if self.pending:
                answered = self.pending.pop(0)
                if answered is not None:
                    self.answered.add(answered)
            else:
                problems.append(f"{where}: {_NO_MATCH}: every call before it is already answered")
        elif call_id in self.pending:
            self.pending.remove(call_id)
            self.answered.add(call_id)
        elif call_id in self.answered:
            problems.append(f"{where}: {_NO_MATCH}: call {call_id!r} is already answered")
        else:
            open_ids = ", ".join(repr(i) for i in self.pending if i is not None)
            open_ids = open_ids or ("only calls without an id" if self.pending else "none")
            problems.append(
                f"{where}: {_NO_MATCH}: tool_call_id {call_id!r} is not an unanswered call of the assistant "
                f"message before it (unanswered: {open_ids})"
            )
