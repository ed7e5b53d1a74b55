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
_SMALL_PIECE = 2048
"""SSE pieces up to this many bytes (one event or a few) are searched forward for a set finish reason
in one regex pass; longer ones (many events that arrived together) are searched from their end."""
_NEAR_END = 8
"""Reasons (``null`` ones included) looked at from the end of an SSE piece before searching all of it:
an answer's set reason is in its last few events (after it: at most other choices' last chunks, the
usage chunk and ``[DONE]``)."""
_RESPONSES_FINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_THINKING = b'"thinking_delta"'
_USAGE_ONLY = re.compile(rb'"choices":\s*\[\s*\]')
_COLON = re.compile(rb"\s*:\s*")
_DECODER = json.JSONDecoder()


def _value_after(data: bytes, pos: int, stop: int = -1) -> Any:
    """The JSON value of the key whose quoted name (``"usage"``) starts at ``pos``, decoded alone from
    ``data[:stop]`` (to the end when ``stop`` < 0).

    Raises:
        ValueError: no colon after the key, or no JSON value after it.
    """
    colon = _COLON.match(data, pos + len(_MARKER))
    if colon is None:
        raise ValueError("no value after the key")
    value, _ = _DECODER.raw_decode(data[colon.end() : None if stop < 0 else stop].decode())
    return value


def _is_final_usage(usage: dict[str, Any]) -> bool:
    """Whether an OpenAI usage object is an answer's final one: it has both prompt and completion tokens
    (vLLM reports running totals, so an earlier one adds nothing)."""
    return "prompt_tokens" in usage and "completion_tokens" in usage


def _event_bounds(events: bytes, pos: int) -> tuple[int, int]:
    """``(start, stop)`` of the SSE event around offset ``pos``: from after the ``\\n\\n`` before it to
    the ``\\n\\n`` after it (or the end)."""
    before = events.rfind(b"\n\n", 0, pos)
    after = events.find(b"\n\n", pos)
    return (0 if before < 0 else before + 2), (len(events) if after < 0 else after)


def _first_finish(data: bytes) -> re.Match[bytes] | None:
    """``_FINISH.search(data)``, reaching each candidate with a byte search for ``_reason"`` instead of
    trying the pattern at every quote (0.5 us against 0.25 us on a 442-byte answer, more on longer
    ones): every match starts at the quote before such a ``_reason"`` (a JSON string cannot hold an
    unescaped quote)."""
    pos = data.find(b'_reason"')
    while pos >= 0:
        found = _FINISH.match(data, data.rfind(b'"', 0, pos))
        if found:
            return found
        pos = data.find(b'_reason"', pos + 8)
    return None


def _last_finish(events: bytes, tries: int = -1) -> tuple[str | None, bool]:
    """The last non-null finish (or stop) reason in ``events``, scanning back from the end (a whole
    answer's reason is in its last events; ``null`` ones are skipped), and whether that is decided.

    With ``tries`` >= 0, gives up undecided (``(None, False)``) after that many ``null`` reasons: every
    OpenAI chunk carries ``"finish_reason":null``, so a piece of many chunks without a set reason would
    cost a step per chunk, where one regex search over the piece costs less.
    """
    pos = len(events)
    while (pos := events.rfind(b'_reason"', 0, pos)) >= 0:
        found = _FINISH.match(events, events.rfind(b'"', 0, pos))
        if found:
            return found.group(1).decode(), True
        tries -= 1
        if tries == 0:
            return None, False
    return None, True


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
    def between_events(self) -> bool:
        """Every SSE byte fed so far belongs to a complete event (none is held back for the next piece):
        once the stream's end event has arrived, its usage has been taken."""
        return not self._tail

    @property
    def total(self) -> int:
        """Prompt + completion tokens (reasoning is part of completion)."""
        return self.prompt + self.completion

    def _take(self, usage: dict[str, Any]) -> None:
        """Keep the largest counts seen in one usage object: OpenAI's names (``prompt_tokens``, ...) or
        Anthropic's and the Responses API's (``input_tokens``, ...); counts that are not ints are ignored."""
        if "prompt_tokens" in usage or "completion_tokens" in usage:  # OpenAI's, every vLLM answer's
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            details, out = usage.get("prompt_tokens_details"), usage.get("completion_tokens_details")
            cached = None
        else:
            prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
            details, out = usage.get("input_tokens_details"), usage.get("output_tokens_details")
            cached = usage.get("cache_read_input_tokens")
        # type() is int: a bool is not a count
        if type(prompt) is int and prompt > self.prompt:
            self.prompt = prompt
        if type(completion) is int and completion > self.completion:
            self.completion = completion
        if isinstance(details, dict) and details:
            cached = details.get("cached_tokens")
        if type(cached) is int and cached > self.cached:
            self.cached = cached
        if isinstance(out, dict) and out:
            reasoning = out.get("reasoning_tokens")
            if type(reasoning) is int:
                self.reasoning = max(self.reasoning, reasoning)
                self.reasoning_reported = True

    def feed_json(self, obj: Any) -> bool:
        """Take usage (and the finish reason) from one decoded JSON object: a whole response or one
        stream event.

        Returns:
            Whether the object holds the answer's final usage: an OpenAI one (``_is_final_usage``), or a
            Responses API ``response.completed`` / ``incomplete`` / ``failed`` event. Anthropic's usage
            is never final on its own: ``message_start`` holds the input and cache tokens,
            ``message_delta`` the output.
        """
        if not isinstance(obj, dict):
            return False
        final = False
        usage = obj.get("usage")
        inner = obj.get("response") or obj.get("message")
        if not isinstance(usage, dict) and isinstance(inner, dict):
            usage = inner.get("usage")
        if isinstance(usage, dict):
            self._take(usage)
            final = _is_final_usage(usage)
        response = obj.get("response") if obj.get("object") != "response" else obj
        if isinstance(response, dict) and isinstance(response.get("status"), str):
            self.finish_reason = response["status"]
            final = final or obj.get("type") in _RESPONSES_FINAL
        if self.collect_thinking:
            self._collect(obj)
        return final

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
        if not self.collect_thinking:
            pos = body.rfind(_MARKER)  # from the end: the usage object closes the body
            if pos < 0 or self._feed_usage_tail(body, pos):
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

    def _feed_usage_tail(self, body: bytes, pos: int) -> bool:
        """Take the usage object whose ``"usage"`` key is at ``pos`` and the body's first finish reason;
        False (nothing taken) when the body has no finish reason or that object is not JSON."""
        found = _first_finish(body)
        if found is None:
            return False
        try:
            usage = _value_after(body, pos)
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
        # One token's event, the usual piece: one forward search says whether any reason is set.
        reason, decided = (None, False) if len(events) <= _SMALL_PIECE else _last_finish(events, _NEAR_END)
        if not decided and _REASON_SET.search(events):
            reason, _ = _last_finish(events)
        if reason is not None:
            self.finish_reason = reason
        if self.collect_thinking and _THINKING in events:
            for event in events.split(b"\n\n"):
                if _MARKER in event or _THINKING in event:
                    self._feed_event(event)
            return
        # Only the events that mention usage are cut out and decoded, the last one first: a whole answer
        # often arrives as one piece of 30+ events, and its final usage is in its last events.
        pos = events.rfind(_MARKER)
        if pos < 0 or self._feed_final_usage(events, pos):
            return
        start, stop = _event_bounds(events, pos)
        if self._feed_event(events[start:stop]):
            return
        pos = events.find(_MARKER)  # all of them in order: counts keep the largest, a status the last
        while pos >= 0:
            start, stop = _event_bounds(events, pos)
            self._feed_event(events[start:stop])
            pos = events.find(_MARKER, stop)

    def _feed_final_usage(self, events: bytes, pos: int) -> bool:
        """Take the usage object whose ``"usage"`` key is at ``pos`` when it is an OpenAI final usage
        (prompt and completion tokens, see ``feed_json``), decoding that object alone instead of its
        event; False (nothing taken) for anything else."""
        try:
            usage = _value_after(events, pos, events.find(b"\n", pos))
        except ValueError:
            return False
        if not isinstance(usage, dict) or not _is_final_usage(usage):
            return False
        self._take(usage)
        return True

    def _feed_event(self, event: bytes) -> bool:
        """Feed an event's ``data:`` lines; whether one held the final usage (``feed_json``)."""
        final = False
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                try:
                    final = self.feed_json(json.loads(line[5:])) or final
                except ValueError:
                    continue
        return final


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
        # From the end: the usage-only chunk is the last data event of a stream (vLLM sends it once every
        # choice has finished), so the first one found ends the search.
        pos = head.rfind(_MARKER)
        while pos >= 0:
            start, stop = _event_bounds(head, pos)
            if _USAGE_ONLY.search(head, start, stop):
                return head[:start] + head[stop + 2 :]
            pos = head.rfind(_MARKER, 0, start)
        return head

    def flush(self) -> bytes:
        """Whatever is held back when the stream ends."""
        tail, self._tail = self._tail, b""
        return tail
