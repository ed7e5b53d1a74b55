"""Read token usage and the finish reason out of upstream responses without touching the bytes that go to
the client (except the one usage-only chunk the gateway asked for itself, see ``UsageChunkFilter``).

OpenAI chat/completions report ``usage.prompt_tokens/completion_tokens`` (in the last stream chunk when
``stream_options.include_usage`` is set), with ``prompt_tokens_details.cached_tokens`` and, when vLLM
runs a reasoning parser, ``completion_tokens_details.reasoning_tokens``; the Responses API reports
``usage.input_tokens/output_tokens`` with ``input_tokens_details.cached_tokens`` and
``output_tokens_details.reasoning_tokens`` (in ``response.completed`` when streaming); Anthropic messages
report ``usage.input_tokens`` (and ``cache_read_input_tokens``) in ``message_start`` and a running
``usage.output_tokens`` in ``message_delta``, and no reasoning count: their thinking text is collected
(``reasoning_text``) so the gateway can count it with the served tokenizer. Counts are cumulative, so
the largest value seen wins.
"""

from __future__ import annotations

import json
import re
from typing import Any

_MARKER = b'"usage"'
_FINISH = re.compile(rb'"(?:finish_reason|stop_reason)":\s*"([A-Za-z_]{1,32})"')
# A reason that is set (a string, not null): every OpenAI chunk carries "finish_reason":null, so a plain
# substring test would send each one to the backward scan of ``_last_finish``.
_REASON_SET = re.compile(rb'_reason":\s*"')
_THINKING = b'"thinking_delta"'
_USAGE_ONLY = re.compile(rb'"choices":\s*\[\s*\]')
_COLON = re.compile(rb"\s*:\s*")
_DECODER = json.JSONDecoder()


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _event_bounds(events: bytes, pos: int) -> tuple[int, int]:
    """``(start, stop)`` of the SSE event around offset ``pos``: from after the ``\\n\\n`` before it to
    the ``\\n\\n`` after it (or the end)."""
    before = events.rfind(b"\n\n", 0, pos)
    after = events.find(b"\n\n", pos)
    return (0 if before < 0 else before + 2), (len(events) if after < 0 else after)


def _last_finish(events: bytes) -> str | None:
    """The last non-null finish (or stop) reason in ``events``, scanning back from the end (a whole
    answer's reason is in its last events; ``null`` ones are skipped)."""
    pos = len(events)
    while (pos := events.rfind(b'_reason"', 0, pos)) >= 0:
        found = _FINISH.match(events, events.rfind(b'"', 0, pos))
        if found:
            return found.group(1).decode()
    return None


class UsageCounter:
    """Collects token counts and the finish reason from JSON bodies or SSE chunks.

    Attributes:
        prompt / completion / reasoning / cached: token counts (0 until seen).
        reasoning_reported: the upstream gave a reasoning count (else count ``reasoning_text``).
        reasoning_text: Anthropic thinking text seen (only collected when ``collect_thinking``).
        finish_reason: the last finish/stop reason seen, or the Responses API's final status.
    """

    __slots__ = (
        "_tail",
        "cached",
        "collect_thinking",
        "completion",
        "finish_reason",
        "prompt",
        "reasoning",
        "reasoning_reported",
        "reasoning_text",
    )

    def __init__(self, collect_thinking: bool = False) -> None:
        self.prompt = 0
        self.completion = 0
        self.reasoning = 0
        self.cached = 0
        self.reasoning_reported = False
        self.reasoning_text: list[str] = []
        self.collect_thinking = collect_thinking
        self.finish_reason: str | None = None
        self._tail = b""

    @property
    def total(self) -> int:
        """Prompt + completion tokens (reasoning is part of completion)."""
        return self.prompt + self.completion

    def _take(self, usage: dict[str, Any]) -> None:
        prompt = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
        completion = _int(usage.get("completion_tokens", usage.get("output_tokens")))
        if prompt is not None:
            self.prompt = max(self.prompt, prompt)
        if completion is not None:
            self.completion = max(self.completion, completion)
        cached = _int(usage.get("cache_read_input_tokens"))
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
        if isinstance(details, dict):
            cached = _int(details.get("cached_tokens"))
        if cached is not None:
            self.cached = max(self.cached, cached)
        out = usage.get("completion_tokens_details") or usage.get("output_tokens_details")
        reasoning = _int(out.get("reasoning_tokens")) if isinstance(out, dict) else None
        if reasoning is not None:
            self.reasoning = max(self.reasoning, reasoning)
            self.reasoning_reported = True

    def feed_json(self, obj: Any) -> None:
        """Take usage (and the finish reason) from one decoded JSON object: a whole response or one
        stream event."""
        if not isinstance(obj, dict):
            return
        usage = obj.get("usage")
        inner = obj.get("response") or obj.get("message")
        if not isinstance(usage, dict) and isinstance(inner, dict):
            usage = inner.get("usage")
        if isinstance(usage, dict):
            self._take(usage)
        response = obj.get("response") if obj.get("object") != "response" else obj
        if isinstance(response, dict) and isinstance(response.get("status"), str):
            self.finish_reason = response["status"]
        if self.collect_thinking:
            self._collect(obj)

    def _collect(self, obj: dict[str, Any]) -> None:
        delta = obj.get("delta")
        if isinstance(delta, dict) and delta.get("type") == "thinking_delta":
            self.reasoning_text.append(str(delta.get("thinking", "")))
        for block in obj.get("content") or ():
            if isinstance(block, dict) and block.get("type") == "thinking":
                self.reasoning_text.append(str(block.get("thinking", "")))

    def feed_body(self, body: bytes) -> None:
        """Take usage from a whole non-streamed JSON body (ignores bodies that are not JSON).

        Where the body has a finish or stop reason, only its last ``"usage"`` object is decoded (the
        top-level one: a quote inside a string value is escaped, so the marker cannot match there);
        otherwise (a Responses API body: its status, or thinking text to collect) the whole body is.
        """
        if _MARKER not in body and not self.collect_thinking:
            return
        if not self.collect_thinking and self._feed_usage_tail(body):
            return
        try:
            obj = json.loads(body)
        except ValueError:
            return
        self.feed_json(obj)
        if isinstance(obj, dict):
            reason = obj.get("stop_reason")
            choices = obj.get("choices")
            if isinstance(choices, list) and choices and isinstance(choices[0], dict):
                reason = choices[0].get("finish_reason")
            if isinstance(reason, str):
                self.finish_reason = reason

    def _feed_usage_tail(self, body: bytes) -> bool:
        found = _FINISH.search(body)
        if found is None:
            return False
        at = body.rfind(_MARKER)
        colon = _COLON.match(body, at + len(_MARKER))
        if colon is None:
            return False
        try:
            usage, _ = _DECODER.raw_decode(body[colon.end() :].decode())
        except ValueError:
            return False
        if isinstance(usage, dict):
            self._take(usage)
        self.finish_reason = found.group(1).decode()
        return True

    def feed_sse(self, chunk: bytes) -> None:
        """Take usage from a piece of an SSE stream; pieces may split events anywhere.

        Only the bytes after the last complete event are kept between calls, and JSON is decoded only
        for events that mention ``"usage"`` (or thinking, when collected).
        """
        data = self._tail + chunk if self._tail else chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._tail = data
            return
        self._tail = data[end + 2 :]
        events = data[:end]
        if _REASON_SET.search(events):
            found = _last_finish(events)
            if found is not None:
                self.finish_reason = found
        if self.collect_thinking and _THINKING in events:
            for event in events.split(b"\n\n"):
                if _MARKER in event or _THINKING in event:
                    self._feed_event(event)
            return
        # Only the events that mention usage are cut out and decoded: a whole answer often arrives as
        # one piece of 30+ events, and splitting it all costs more than finding the one or two that count.
        pos = events.find(_MARKER)
        while pos >= 0:
            start, stop = _event_bounds(events, pos)
            self._feed_event(events[start:stop])
            pos = events.find(_MARKER, stop)

    def _feed_event(self, event: bytes) -> None:
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                try:
                    self.feed_json(json.loads(line[5:]))
                except ValueError:
                    continue


class UsageChunkFilter:
    """Drops the usage-only chunk (``"choices": []`` + ``usage``) from an OpenAI stream whose client did not
    ask for usage: the gateway asks vLLM for it on every stream (the ledger needs it), and clients that
    did not ask crash on a chunk with no choices.

    Whole events pass through unchanged, as soon as their ``\\n\\n`` arrives; a partial event waits for
    its end (vLLM writes each event whole, so nothing waits in practice).
    """

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of ``chunk`` (with what was held back) to send on now."""
        data = self._tail + chunk if self._tail else chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._tail = data
            return b""
        self._tail = data[end + 2 :]
        head = data[: end + 2]
        pos = head.find(_MARKER)
        if pos < 0:
            return head
        kept: list[bytes] = []
        done = 0  # head[:done] is decided
        while pos >= 0:
            start, stop = _event_bounds(head, pos)
            if _USAGE_ONLY.search(head, start, stop):
                kept.append(head[done:start])
                done = stop + 2
            pos = head.find(_MARKER, stop)
        kept.append(head[done:])
        return b"".join(kept)

    def flush(self) -> bytes:
        """Whatever is held back when the stream ends."""
        tail, self._tail = self._tail, b""
        return tail
