"""The load of `make soak-ledger`: a fixed plan of chat completions sent through the gateway with bounded
concurrency, the upstream killed and restarted in the middle, and what the client saw for each request.

Every request carries its own ``x-request-id``. Kinds (``plan``): non-streamed; streamed without and with
``stream_options.include_usage``; long streams (so that some are mid-way when the upstream dies);
streams the client leaves after their first event; non-streamed requests the client leaves after
``leave_after_s`` without an answer (both long generations, so they are still running when the client
goes).

A client that leaves must know its request reached the gateway, or it cannot say whether a row is owed:
under load a request the client gave up on after 2 ms had sometimes not been read by the gateway at
all (no access-log line, no row; the client's close discards it). Streams leave after an answer event,
so they reached it. Non-streamed leavers are sent with ``Expect: 100-continue`` on a plain connection
(``h11``): uvicorn answers 100 only when the gateway asks for the body, and the leave timer starts then.

The outage (``Outage``): from request ``kill_at`` on, the kill waits (the load going on) until a long
stream is mid-way, then kills the upstream with requests in flight; the next ``outage_requests``
requests go out while it is down (the gateway answers 503); once they are all answered the upstream is
restarted and waited for, and only then do the later requests go out.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import h11

KINDS = {
    # kind: (share of the load, streamed, max_tokens); the rest (``json``) fills up to 1.
    "stream": (0.22, True, None),
    "stream_usage": (0.22, True, None),
    "long_stream": (0.03, True, 48),
    "leave_stream": (0.05, True, 512),
    "leave_json": (0.02, False, 512),
}
SHORT_MAX_TOKENS = (1, 2, 3, 4)
PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class Spec:
    """One planned request."""

    index: int
    request_id: str
    kind: str
    max_tokens: int

    @property
    def stream(self) -> bool:
        return self.kind != "json" and KINDS[self.kind][1]

    @property
    def leaves(self) -> bool:
        return self.kind.startswith("leave_")

    def body(self, model: str) -> dict[str, Any]:
        """The request body (long kinds ignore EOS so that they really are long on vLLM)."""
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": f"Soak request {self.index}: say something short."}],
            "max_tokens": self.max_tokens,
            "stream": self.stream,
        }
        if self.kind == "stream_usage":
            body["stream_options"] = {"include_usage": True}
        if self.max_tokens > max(SHORT_MAX_TOKENS):
            body["ignore_eos"] = True
        return body


def plan(requests: int, run_id: str, seed: int = 0) -> list[Spec]:
    """``requests`` specs with ids ``soak-<run_id>-<index>``, kinds drawn with ``KINDS``' shares."""
    rng = random.Random(seed)
    specs = []
    for index in range(requests):
        draw, kind, tokens = rng.random(), "json", rng.choice(SHORT_MAX_TOKENS)
        for name, (share, _, max_tokens) in KINDS.items():
            if draw < share:
                kind, tokens = name, max_tokens or tokens
                break
            draw -= share
        specs.append(Spec(index, f"soak-{run_id}-{index:06d}", kind, tokens))
    return specs


@dataclass
class Seen:
    """What the client saw for one request.

    Attributes:
        result: ``complete`` (a whole answer, or ``[DONE]`` without an error event), ``left_early`` (the
            client went before the end), ``stream_broken`` (status 200, then an error event or no
            ``[DONE]``), ``error_status`` (an answer with status >= 400), ``transport_error`` (the
            connection to the gateway failed).
        status: the HTTP status, when one arrived.
        usage: ``(prompt_tokens, completion_tokens)`` from the body or the stream's usage chunk.
        usage_only_chunk: a chunk with ``"choices": []`` reached the client.
        phase: ``before``, ``at_kill`` (in flight when the upstream was killed), ``outage`` or ``after``.
    """

    spec: Spec
    result: str = "transport_error"
    status: int | None = None
    usage: tuple[int, int] | None = None
    usage_only_chunk: bool = False
    error: str | None = None
    phase: str = "before"
    started: float = 0.0
    elapsed_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.spec.request_id,
            "kind": self.spec.kind,
            "result": self.result,
            "status": self.status,
            "usage": list(self.usage) if self.usage else None,
            "usage_only_chunk": self.usage_only_chunk,
            "error": self.error,
            "phase": self.phase,
        }


@dataclass
class Outage:
    """When to kill the upstream and how to bring it back.

    Attributes:
        kill_at: the request whose turn arms the kill. It fires as soon as a long stream is mid-way
            (the load goes on meanwhile), after ``mid_way_wait_s`` at most, and before the load runs
            so far that fewer than ``outage_requests`` + 1 requests would be left.
        outage_requests: requests sent while the upstream is down, from the first one after the kill.
        kill: SIGKILLs the upstream (fast, called on the event loop).
        restart: starts it again and waits until it answers (blocking; runs in a thread); returns
            seconds taken.
        outage_start: index of the first request sent after the kill (set when it fires).
    """

    kill_at: int
    outage_requests: int
    kill: Callable[[], None]
    restart: Callable[[], float]
    mid_way_wait_s: float = 30.0
    outage_start: int | None = None
    killed_at: float | None = None
    killed_wall: datetime | None = None
    resumed_wall: datetime | None = None
    restart_s: float | None = None
    streams_mid_way_at_kill: int = 0
    in_flight_at_kill: int = 0

    @property
    def window(self) -> tuple[datetime, datetime] | None:
        """From just before the kill until the upstream answered again (UTC), once both happened."""
        if self.killed_wall is None or self.resumed_wall is None:
            return None
        return self.killed_wall, self.resumed_wall

    @property
    def resume_at(self) -> int:
        """Index of the first request sent after the restart (once the kill has fired)."""
        assert self.outage_start is not None
        return self.outage_start + self.outage_requests


@dataclass
class LoadResult:
    seen: list[Seen]
    elapsed_s: float
    outage: Outage
    timeline: dict[str, float] = field(default_factory=dict)


def _events(buffer: bytearray) -> list[bytes]:
    """Take the complete SSE events out of ``buffer``."""
    end = buffer.rfind(b"\n\n")
    if end < 0:
        return []
    events = bytes(buffer[:end]).split(b"\n\n")
    del buffer[: end + 2]
    return events


def _take_usage(seen: Seen, obj: dict[str, Any]) -> None:
    usage = obj.get("usage")
    if isinstance(usage, dict):
        seen.usage = (int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))


async def _read_stream(response: aiohttp.ClientResponse, seen: Seen, mid_way: set[int]) -> None:
    """Read an SSE answer into ``seen``. A leaving client goes after the first answer event (an error
    event or ``[DONE]`` is the end of the stream, not something to leave after)."""
    buffer = bytearray()
    done = errored = False
    answered = False
    async for chunk in response.content.iter_any():
        buffer += chunk
        for event in _events(buffer):
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    continue
                obj = json.loads(payload)
                if "error" in obj:
                    errored = True
                    seen.error = str(obj["error"].get("message"))[:200]
                    continue
                answered = True
                if obj.get("choices") == []:
                    seen.usage_only_chunk = True
                _take_usage(seen, obj)
            if answered and not (done or errored):
                if seen.spec.leaves:
                    seen.result = "left_early"
                    response.close()  # drop the connection mid-stream
                    return
                mid_way.add(seen.spec.index)
    seen.result = "complete" if done and not errored else "stream_broken"


async def _next_event(connection: h11.Connection, reader: asyncio.StreamReader) -> Any:
    """The next h11 event of ``connection``, reading from ``reader`` as needed.

    Raises:
        h11.RemoteProtocolError: the server closed the connection instead.
    """
    while True:
        event = connection.next_event()
        if isinstance(event, h11.ConnectionClosed):
            raise h11.RemoteProtocolError("the gateway closed the connection")
        if event is not h11.NEED_DATA:
            return event
        connection.receive_data(await reader.read(65536))


class LoadGenerator:
    """Sends ``specs`` to ``url`` with ``concurrency`` requests in flight, around one outage.

    Args:
        url: the gateway's base URL.
        key: the API key.
        model: the served model id.
        specs: the plan.
        concurrency: requests in flight at once.
        outage: when to kill and restart the upstream.
        leave_after_s: how long a ``leave_json`` client waits for its answer before it goes.
    """

    def __init__(
        self,
        url: str,
        key: str,
        model: str,
        specs: list[Spec],
        concurrency: int,
        outage: Outage,
        leave_after_s: float = 0.3,
    ) -> None:
        self.url = url
        self.key = key
        self.model = model
        self.specs = specs
        self.concurrency = concurrency
        self.outage = outage
        self.leave_after_s = leave_after_s
        self.seen = [Seen(spec) for spec in specs]
        self._next = 0
        self._in_flight: set[int] = set()
        self._mid_way: set[int] = set()  # long streams that have had their first event and not ended
        self._killed = asyncio.Event()
        self._resumed = asyncio.Event()
        self._outage_left = outage.outage_requests
        self._killer: asyncio.Task[None] | None = None
        self._restart: asyncio.Task[None] | None = None
        self._last_kill_index = len(specs) - outage.outage_requests - 1
        self.timeline: dict[str, float] = {}
        self._start = time.monotonic()

    async def _one(self, session: aiohttp.ClientSession, seen: Seen) -> None:
        spec = seen.spec
        headers = {"x-request-id": spec.request_id}
        mid_way = self._mid_way if spec.kind == "long_stream" else set()
        try:
            if spec.kind == "leave_json":
                await self._leave_json(seen)
                return
            response = await session.post(self.url + PATH, json=spec.body(self.model), headers=headers)
            async with response:
                seen.status = response.status
                if response.status >= 400:
                    seen.result = "error_status"
                    seen.error = (await response.text())[:200]
                elif spec.stream:
                    await _read_stream(response, seen, mid_way)
                else:
                    obj = await response.json()
                    _take_usage(seen, obj)
                    seen.result = "complete"
        except (aiohttp.ClientError, h11.ProtocolError, OSError, ValueError) as exc:
            seen.result = "transport_error"
            seen.error = repr(exc)[:200]
        finally:
            mid_way.discard(spec.index)

    async def _leave_json(self, seen: Seen) -> None:
        """A non-streamed request whose client goes ``leave_after_s`` after the gateway started reading
        its body, unless an answer came first (read then like any other)."""
        spec = seen.spec
        body = json.dumps(spec.body(self.model)).encode()
        where = urlsplit(self.url)
        assert where.hostname is not None and where.port is not None
        connection = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="POST",
            target=PATH,
            headers=[
                ("host", where.netloc),
                ("authorization", f"Bearer {self.key}"),
                ("x-request-id", spec.request_id),
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
                ("expect", "100-continue"),
                ("connection", "close"),
            ],
        )
        reader, writer = await asyncio.open_connection(where.hostname, where.port)
        try:
            writer.write(connection.send(request) or b"")
            await writer.drain()
            event = await _next_event(connection, reader)
            if isinstance(event, h11.InformationalResponse):
                writer.write(
                    (connection.send(h11.Data(data=body)) or b"")
                    + (connection.send(h11.EndOfMessage()) or b"")
                )
                await writer.drain()
                try:
                    async with asyncio.timeout(self.leave_after_s):
                        event = await _next_event(connection, reader)
                except TimeoutError:
                    seen.result = "left_early"
                    return  # the finally closes the connection: the client is gone
            if not isinstance(event, h11.Response):
                raise h11.RemoteProtocolError(f"expected a response, got {event!r}")
            seen.status = event.status_code
            payload = b""
            while not isinstance(event := await _next_event(connection, reader), h11.EndOfMessage):
                if isinstance(event, h11.Data):
                    payload += event.data
            if seen.status >= 400:
                seen.result = "error_status"
                seen.error = payload[:200].decode(errors="replace")
            else:
                _take_usage(seen, json.loads(payload))
                seen.result = "complete"
        finally:
            writer.close()

    async def _kill(self) -> None:
        outage = self.outage
        deadline = time.monotonic() + outage.mid_way_wait_s
        while not self._mid_way and time.monotonic() < deadline and self._next < self._last_kill_index:
            await asyncio.sleep(0.005)
        outage.streams_mid_way_at_kill = len(self._mid_way)
        outage.in_flight_at_kill = len(self._in_flight)
        for index in self._in_flight:
            self.seen[index].phase = "at_kill"
        outage.killed_wall = datetime.now(UTC)
        outage.kill()
        outage.outage_start = self._next
        outage.killed_at = time.monotonic()
        self.timeline["killed"] = outage.killed_at - self._start
        self._killed.set()

    async def _restart_upstream(self) -> None:
        self.timeline["restart_started"] = time.monotonic() - self._start
        self.outage.restart_s = await asyncio.to_thread(self.outage.restart)
        self.outage.resumed_wall = datetime.now(UTC)
        self.timeline["resumed"] = time.monotonic() - self._start
        self._resumed.set()

    def _phase(self, index: int) -> str:
        start = self.outage.outage_start
        if start is None or index < start:
            return "before"
        return "outage" if index < self.outage.resume_at else "after"

    async def _worker(self, session: aiohttp.ClientSession) -> None:
        outage = self.outage
        while True:
            if not self._killed.is_set() and self._next >= self._last_kill_index:
                await self._killed.wait()  # the kill must leave room for the outage and one more
                continue
            if self._killed.is_set() and self._next >= outage.resume_at and not self._resumed.is_set():
                await self._resumed.wait()
                continue
            if self._next >= len(self.specs):
                return
            index = self._next
            self._next += 1
            if index == outage.kill_at:
                self._killer = asyncio.create_task(self._kill())
            seen = self.seen[index]
            seen.phase = self._phase(index)
            self._in_flight.add(index)
            seen.started = time.monotonic()
            try:
                await self._one(session, seen)
            finally:
                seen.elapsed_s = time.monotonic() - seen.started
                self._in_flight.discard(index)
            if seen.phase == "outage":
                self._outage_left -= 1
                if self._outage_left == 0:
                    self._restart = asyncio.create_task(self._restart_upstream())

    async def run(self) -> LoadResult:
        """Send everything; returns what the client saw for each request."""
        self._start = time.monotonic()
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        timeout = aiohttp.ClientTimeout(total=600, sock_read=300)
        auth = {"authorization": f"Bearer {self.key}"}
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=auth) as session:
            workers = [asyncio.create_task(self._worker(session)) for _ in range(self.concurrency)]
            await asyncio.gather(*workers)
            for task in (self._killer, self._restart):
                if task is not None:
                    await task  # errors of the kill or the restart surface here
        return LoadResult(self.seen, time.monotonic() - self._start, self.outage, self.timeline)


def run_load(
    url: str, key: str, model: str, specs: list[Spec], concurrency: int, outage: Outage
) -> LoadResult:
    """``LoadGenerator(...).run()`` in a fresh event loop."""

    return asyncio.run(LoadGenerator(url, key, model, specs, concurrency, outage).run())
