"""Closed-loop HTTP/1.1 load for `make bench-gateway`: N keep-alive connections, each sending the next
request as soon as the last reply ends, every request timed.

Raw asyncio protocol (run it under uvloop), no HTTP library, so that the client's own cost stays small:
``bench_gateway.py`` reports it by running the same load against the upstream directly. Per request it
records the time to the first body bytes (for a stream: to the first bytes holding an SSE ``data:``
event, i.e. TTFT) and to the end of the reply; percentiles are exact (nearest rank over every request).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass
from typing import cast

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked", re.I)
_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.I)
REQUEST_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Target:
    """Where to send load: ``POST path`` on 127.0.0.1:``port`` with an optional bearer key."""

    name: str
    port: int
    path: str = "/v1/chat/completions"
    key: str = ""

    def request(self, body: bytes) -> bytes:
        auth = f"authorization: Bearer {self.key}\r\n" if self.key else ""
        head = (
            f"POST {self.path} HTTP/1.1\r\nhost: 127.0.0.1:{self.port}\r\ncontent-type: application/json\r\n"
            f"accept: */*\r\n{auth}content-length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body


class _Conn(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, float, float, bool]] | None = None
        self.reuse = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.reuse = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed mid-reply"))

    def send(self, request: bytes) -> asyncio.Future[tuple[int, float, float, bool]]:
        """Send ``request``; the future gives (status, seconds to first data, seconds to end, done seen)."""
        assert self.transport is not None
        self.buf = bytearray()
        self.body_at = -1  # where the body starts in buf, once the head is in
        self.length: int | None = None  # content-length, or None for chunked
        self.next_chunk = 0  # chunked: offset in buf of the next chunk-size line
        self.first: float | None = None
        self.waiter = asyncio.get_running_loop().create_future()
        self.t0 = time.perf_counter()
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.waiter is None or self.waiter.done():
            return
        buf = self.buf
        buf += data
        if self.body_at < 0:
            end_of_head = buf.find(b"\r\n\r\n")
            if end_of_head < 0:
                return
            head = bytes(buf[:end_of_head])
            self.status = int(head[9:12])
            self.reuse = not _CLOSE.search(head)
            match = _CONTENT_LENGTH.search(head)
            if match is None and not _CHUNKED.search(head):
                self.waiter.set_exception(
                    ConnectionError("reply has neither content-length nor chunked body")
                )
                return
            self.length = int(match.group(1)) if match else None
            self.body_at = self.next_chunk = end_of_head + 4
        body_started = len(buf) > self.body_at
        if self.first is None and body_started and (not self.stream or buf.find(b"data:", self.body_at) >= 0):
            self.first = now
        if self._complete():
            done = not self.stream or buf.rfind(b"data: [DONE]", max(self.body_at, len(buf) - 64)) >= 0
            self.waiter.set_result((self.status, self.first - self.t0, now - self.t0, done))  # type: ignore[operator]

    def _complete(self) -> bool:
        buf = self.buf
        if self.length is not None:
            return len(buf) - self.body_at >= self.length
        while True:  # walk the chunk framing: "<hex size>\r\n<data>\r\n" ... "0\r\n\r\n"
            line_end = buf.find(b"\r\n", self.next_chunk)
            if line_end < 0:
                return False
            size = int(bytes(buf[self.next_chunk : line_end]).split(b";", 1)[0], 16)
            if size == 0:
                return len(buf) >= line_end + 4
            after = line_end + 2 + size + 2
            if len(buf) < after:
                return False
            self.next_chunk = after


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an ascending list (exact: one of the values), None when empty."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


async def _client(
    target: Target,
    request: bytes,
    stream: bool,
    deadline: float,
    timings: list[tuple[float, float]],
    errors: list[str],
) -> None:
    loop = asyncio.get_running_loop()
    conn: _Conn | None = None
    while time.perf_counter() < deadline:
        try:
            if conn is None:
                _, conn = await loop.create_connection(lambda: _Conn(stream), "127.0.0.1", target.port)
            status, first, total, done = await asyncio.wait_for(conn.send(request), REQUEST_TIMEOUT_S)
            if status == 200 and done:
                timings.append((first, total))
            else:
                errors.append(f"HTTP {status}" + ("" if done else ", stream without [DONE]"))
            if not conn.reuse:
                conn.transport.close()  # type: ignore[union-attr]
                conn = None
        except (OSError, TimeoutError, ConnectionError) as exc:
            errors.append(repr(exc))
            if conn is not None and conn.transport is not None:
                conn.transport.close()
            conn = None
            await asyncio.sleep(0.01)  # a refused connection must not spin
    if conn is not None and conn.transport is not None:
        conn.transport.close()


async def run_load(target: Target, body: bytes, stream: bool, clients: int, duration_s: float) -> dict:
    """``clients`` closed-loop connections for ``duration_s``; requests in flight at the end complete.

    Returns requests, errors (count and up to 3 samples), wall_s, rps, first/total p50/p90/p99 in ms.
    """
    request = target.request(body)
    timings: list[tuple[float, float]] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    await asyncio.gather(
        *(_client(target, request, stream, t0 + duration_s, timings, errors) for _ in range(clients))
    )
    wall = time.perf_counter() - t0
    first = sorted(t[0] for t in timings)
    total = sorted(t[1] for t in timings)
    result: dict = {
        "requests": len(timings),
        "errors": len(errors),
        "error_samples": errors[:3],
        "wall_s": round(wall, 3),
        "rps": round(len(timings) / wall, 1),
    }
    for name, values in (("first", first), ("total", total)):
        for p in (50, 90, 99):
            value = percentile(values, p)
            result[f"{name}_p{p}_ms"] = None if value is None else round(value * 1e3, 4)
    return result
