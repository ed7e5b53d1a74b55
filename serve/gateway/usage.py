"""Read token usage out of upstream responses without touching the bytes that go to the client.

OpenAI chat/completions report ``usage.prompt_tokens/completion_tokens`` (in the last stream chunk when
``stream_options.include_usage`` is set); the Responses API reports ``usage.input_tokens/output_tokens``
(in ``response.completed`` when streaming); Anthropic messages report ``usage.input_tokens`` in
``message_start`` and a running ``usage.output_tokens`` in ``message_delta``. Counts are cumulative, so
the largest value seen wins.
"""

from __future__ import annotations

import json
from typing import Any

_MARKER = b'"usage"'


class UsageCounter:
    """Collects ``prompt``/``completion`` token counts from JSON bodies or SSE chunks."""

    __slots__ = ("_tail", "completion", "prompt")

    def __init__(self) -> None:
        self.prompt = 0
        self.completion = 0
        self._tail = b""

    def feed_json(self, obj: Any) -> None:
        """Take usage from one decoded JSON object (a whole response or one stream event)."""
        if not isinstance(obj, dict):
            return
        usage = obj.get("usage")
        if not isinstance(usage, dict):
            inner = obj.get("response") or obj.get("message")
            usage = inner.get("usage") if isinstance(inner, dict) else None
        if not isinstance(usage, dict):
            return
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens"))
        if isinstance(prompt, int):
            self.prompt = max(self.prompt, prompt)
        if isinstance(completion, int):
            self.completion = max(self.completion, completion)

    def feed_body(self, body: bytes) -> None:
        """Take usage from a whole non-streamed JSON body (ignores bodies that are not JSON)."""
        if _MARKER not in body:
            return
        try:
            self.feed_json(json.loads(body))
        except ValueError:
            return

    def feed_sse(self, chunk: bytes) -> None:
        """Take usage from a piece of an SSE stream; pieces may split events anywhere.

        Only the bytes after the last complete event are kept between calls, and JSON is decoded only
        for events that mention ``"usage"``.
        """
        data = self._tail + chunk if self._tail else chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._tail = data
            return
        self._tail = data[end + 2 :]
        if _MARKER not in data[:end]:
            return
        for event in data[:end].split(b"\n\n"):
            if _MARKER not in event:
                continue
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    try:
                        self.feed_json(json.loads(line[5:]))
                    except ValueError:
                        continue
