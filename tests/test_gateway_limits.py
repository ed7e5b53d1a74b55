"""Per-key limits through the real gateway with 2 uvicorn workers (a subprocess, tests/gateway_process.py)
in front of a fake vLLM in this process, in each store limits can count in: memory shared by the host's
workers (the default), the SQL database on SQLite (``limits_store: database``) and on PostgreSQL
(``database_url``, a team's several hosts). Exact across workers, 429s in each API's shape that the
official SDKs recognise, and budgets that outlive a gateway restart (issue #8, section 1).

Both workers take part in every burst: each request is sent on a keep-alive connection whose worker is
known (``connections_per_worker``), with more requests per worker than the limit, so a limit counted per
worker instead of shared would admit up to twice the limit.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from aiohttp import web
from sqlalchemy import select

from serve.gateway.keys import KeyPolicy, KeyStore
from serve.gateway.shared_counters import SharedCounters
from serve.gateway.store import LimitState, open_engine
from tests.conftest import ThreadedAiohttp
from tests.gateway_process import GatewayProcess, Reply, WorkerConnection, gateway_process
from tests.postgres import new_database

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
PER_WORKER = 8  # requests each worker gets in a burst: more than any limit below
HOLD_TIMEOUT_S = 60.0  # a held upstream request gives up after this (liveness only)

# Every key the module's gateways know, created before they start (a key made later would wait for the
# workers' key cache to reload). One key per test: limits count per key name.
KEYS = {
    "rpm": KeyPolicy(rpm=5),
    "concurrent": KeyPolicy(max_concurrent=3),
    "rpm-shape": KeyPolicy(rpm=1),
    "tpm-shape": KeyPolicy(tpm=1000),
    "budget-shape": KeyPolicy(budget_day=1000),
    "too-big": KeyPolicy(tpm=1000),
    "tpm-parallel": KeyPolicy(tpm=1000),
    "messages-shape": KeyPolicy(rpm=1),
    "openai-sdk": KeyPolicy(rpm=1),
    "anthropic-sdk": KeyPolicy(rpm=1),
    "unlimited": KeyPolicy(),
    "leased": KeyPolicy(rpm=200),  # far enough from its limit for the workers to take leases
}


def minute_requests(database: str, name: str) -> int:
    """Requests the database's limit counter holds for key ``name`` in its current minute window."""
    engine = open_engine(database)
    try:
        with engine.connect() as connection:
            state = connection.execute(select(LimitState).where(LimitState.name == name)).one()
        return int(state.minute_requests)
    finally:
        engine.dispose()


@dataclass
class FakeVllm:
    """What the fake upstream saw. A request whose body says ``"hold": true`` waits until ``release``
    is set; every answer reports ``prompt_tokens`` 5 and as many completion tokens as ``max_tokens``
    allows (a generation that ran to its length limit), or the body's ``"use"`` when it has one, so
    the usage a request settles to is known in advance."""

    calls: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    release: threading.Event = field(default_factory=threading.Event)

    async def _generate(self, request: web.Request) -> dict[str, Any]:
        body = await request.json()
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            deadline = time.monotonic() + HOLD_TIMEOUT_S
            while body.get("hold") and not self.release.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            self.in_flight -= 1
        return body

    async def chat(self, request: web.Request) -> web.Response:
        body = await self._generate(request)
        completion = body.get("use", body.get("max_tokens") or 1)
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": body.get("model"),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "length"}
                ],
                "usage": {
                    "prompt_tokens": 5,
                    "completion_tokens": completion,
                    "total_tokens": 5 + completion,
                },
            }
        )

    async def messages(self, request: web.Request) -> web.Response:
        body = await self._generate(request)
        return web.json_response(
            {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": body.get("model"),
                "content": [{"type": "text", "text": "Hi"}],
                "stop_reason": "max_tokens",
                "stop_sequence": None,
                "usage": {"input_tokens": 5, "output_tokens": body.get("max_tokens", 1)},
            }
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_post(CHAT, self.chat)
        app.router.add_post(MESSAGES, self.messages)
        return app


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[ThreadedAiohttp, FakeVllm]]:
    fake = FakeVllm()
    server = ThreadedAiohttp(fake.app()).start()
    yield server, fake
    fake.release.set()
    server.stop()


@pytest.fixture(autouse=True)
def _fresh_upstream(upstream: tuple[ThreadedAiohttp, FakeVllm]) -> None:
    """Each test counts its own upstream calls, and starts with held requests held."""
    fake = upstream[1]
    fake.release.set()
    deadline = time.monotonic() + 10
    while fake.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    fake.calls = fake.max_in_flight = 0
    fake.release.clear()


@dataclass
class Running:
    """A gateway process with its keys."""

    process: GatewayProcess
    keys: dict[str, str]
    database: str

    @property
    def url(self) -> str:
        return self.process.url


def create_keys(database: Path | str) -> dict[str, str]:
    """Every key of ``KEYS`` in ``database``: name -> plaintext key."""
    store = KeyStore(database)
    keys = {name: store.create(name, policy) for name, policy in KEYS.items()}
    store.engine.dispose()
    return keys


@pytest.fixture(scope="module")
def memory_gateway(
    upstream: tuple[ThreadedAiohttp, FakeVllm], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    """The default: keys and ledger in SQLite, limits in memory shared by the two workers."""
    folder = tmp_path_factory.mktemp("gw-memory")
    keys = create_keys(folder / "gw.sqlite")
    with gateway_process(folder, upstream[0].url) as process:
        # It counts where this test says it does: the workers' shared counters file.
        assert (folder / "run" / f"gateway-limits-{process.port}.counters").is_file()
        yield Running(process, keys, f"sqlite:///{folder / 'gw.sqlite'}")


@pytest.fixture(scope="module")
def sqlite_gateway(
    upstream: tuple[ThreadedAiohttp, FakeVllm], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    """Limits counted in the SQLite database (``limits_store: database``), a transaction each."""
    folder = tmp_path_factory.mktemp("gw-sqlite")
    keys = create_keys(folder / "gw.sqlite")
    with gateway_process(folder, upstream[0].url, {"KIT_GATEWAY_LIMITS_STORE": "database"}) as process:
        assert not (folder / "run" / f"gateway-limits-{process.port}.counters").exists()
        yield Running(process, keys, f"sqlite:///{folder / 'gw.sqlite'}")


@pytest.fixture(scope="module")
def postgres_gateway(
    upstream: tuple[ThreadedAiohttp, FakeVllm], tmp_path_factory: pytest.TempPathFactory, postgres_url: str
) -> Iterator[Running]:
    """The gateway as a team runs it on several hosts: keys, counters and ledger in PostgreSQL (a fresh
    database on the session's server, dropped at the end)."""
    folder = tmp_path_factory.mktemp("gw-postgres")
    with new_database(postgres_url, "gateway") as url:
        keys = create_keys(url)
        with gateway_process(folder, upstream[0].url, {"KIT_GATEWAY_DATABASE_URL": url}) as process:
            yield Running(process, keys, url)


def room_in_window(window_s: float, needed_s: float) -> None:
    """Wait for the next UTC window (minute: 60, day: 86400) if fewer than ``needed_s`` seconds are left
    in this one: a burst that straddled a reset would rightly admit up to twice the limit."""
    left = window_s - time.time() % window_s
    if left < needed_s:
        time.sleep(left + 0.5)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def chat(max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens, **extra}


def reset_of(reply: Reply | httpx.Response) -> str:
    """The ``x-ratelimit-reset`` header (the window's end, ISO UTC)."""
    return reply.headers["x-ratelimit-reset"]


def check_retry_after(headers: Any, reset: str, now: float) -> None:
    """``Retry-After`` is the whole seconds from ``now`` to ``reset`` (give or take the request's time)."""
    until = datetime.strptime(reset, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp() - now
    retry = int(headers["retry-after"])
    assert retry >= 1
    assert abs(retry - until) <= 3, (retry, until)


def burst(
    connections: list[WorkerConnection], path: str, payload: dict[str, Any], key: str
) -> list[Future[Reply]]:
    """Send one request on every connection at the same moment (one thread each)."""
    start = threading.Barrier(len(connections))

    def send(connection: WorkerConnection) -> Reply:
        start.wait(timeout=30)
        return connection.post(path, payload, bearer(key))

    pool = ThreadPoolExecutor(len(connections))
    futures = [pool.submit(send, c) for c in connections]
    pool.shutdown(wait=False)
    return futures


# --- exact across two workers ------------------------------------------------------------------------


STORES = ["memory", "sqlite", "postgres"]


def gateway_of(request: pytest.FixtureRequest, store: str) -> Running:
    """The module's gateway counting limits in ``store``."""
    gateway: Running = request.getfixturevalue(f"{store}_gateway")
    return gateway


@pytest.mark.parametrize("store", STORES)
def test_rpm_admits_exactly_k_of_parallel_requests_across_two_workers(
    request: pytest.FixtureRequest, upstream: tuple[ThreadedAiohttp, FakeVllm], store: str
) -> None:
    gateway = gateway_of(request, store)
    fake = upstream[1]
    room_in_window(60, 20)
    connections = gateway.process.connections_per_worker(PER_WORKER)
    assert {c.pid for c in connections} == gateway.process.worker_pids()
    assert len(gateway.process.worker_pids()) == 2

    futures = burst(connections, CHAT, chat(), gateway.keys["rpm"])
    done, _ = wait(futures, timeout=120, return_when=FIRST_EXCEPTION)
    assert len(done) == len(futures), "requests still running after 120 s"
    replies = [f.result() for f in futures]

    statuses = sorted(r.status for r in replies)
    assert statuses == [200] * 5 + [429] * (2 * PER_WORKER - 5), statuses
    assert fake.calls == 5
    # Each request went over its own connection, still held by the worker it was gathered for.
    ports = {c.conn.sock.getsockname()[1]: c.pid for c in connections if c.conn.sock is not None}
    assert gateway.process.workers_of(ports) == ports
    assert Counter(ports.values()) == dict.fromkeys(gateway.process.worker_pids(), PER_WORKER)
    for reply in replies:
        if reply.status == 429:
            assert reply.body["error"]["type"] == "requests"
            assert reply.headers["x-ratelimit-limit"] == "rpm=5"
    if store != "memory":  # the database's counter says 5 too (a denial counts nothing)
        assert minute_requests(gateway.database, "rpm") == 5
    # Spent for this minute: the next request is refused by whichever worker takes it.
    again = httpx.post(gateway.url + CHAT, json=chat(), headers=bearer(gateway.keys["rpm"]), timeout=30)
    assert again.status_code == 429


def test_with_leases_on_both_workers_a_limit_of_k_still_admits_exactly_k(
    memory_gateway: Running, upstream: tuple[ThreadedAiohttp, FakeVllm]
) -> None:
    # rpm=200 is far enough from spent that each worker admits from a lease of the key's counters
    # (limits.LocalLimiter). One burst reaches both workers, so each takes a lease; then only one worker
    # gets requests. The idle worker's lease comes back (unused for 0.25 s, or asked back by a request it
    # refuses: tests/test_limits.py checks each) and no lease is taken near the limit: exactly 200 of
    # the 216 requests go through, never more.
    gateway, fake = memory_gateway, upstream[1]
    room_in_window(60, 40)
    connections = gateway.process.connections_per_worker(PER_WORKER)
    busy_pid = connections[0].pid
    busy = [c for c in connections if c.pid == busy_pid]
    assert len(busy) == PER_WORKER and len({c.pid for c in connections}) == 2
    statuses: list[int] = []
    for round_ in range(26):
        futures = burst(connections if round_ == 0 else busy, CHAT, chat(), gateway.keys["leased"])
        done, _ = wait(futures, timeout=120, return_when=FIRST_EXCEPTION)
        assert len(done) == len(futures), "requests still running after 120 s"
        statuses += [f.result().status for f in futures]
        if round_ == 0:  # the leases are counted up front: more than the 16 requests sent so far
            folder = Path(gateway.database.removeprefix("sqlite:///")).parent
            counters = SharedCounters(folder / "run" / f"gateway-limits-{gateway.process.port}.counters")
            with counters.locked():
                counted = counters.read("leased")[1]
            counters.close()
            assert counted > 2 * PER_WORKER, counted
    assert len(statuses) == 216
    assert Counter(statuses) == {200: 200, 429: 16}
    assert fake.calls == 200


@pytest.mark.parametrize("store", STORES)
def test_max_concurrent_admits_exactly_k_at_once_across_two_workers(
    request: pytest.FixtureRequest, upstream: tuple[ThreadedAiohttp, FakeVllm], store: str
) -> None:
    gateway = gateway_of(request, store)
    fake = upstream[1]
    connections = gateway.process.connections_per_worker(PER_WORKER)
    futures = burst(connections, CHAT, chat(hold=True), gateway.keys["concurrent"])
    try:
        # The 3 admitted requests wait in the upstream until released; every other one is refused now.
        refused = 2 * PER_WORKER - 3
        deadline = time.monotonic() + 60
        while (
            (sum(f.done() for f in futures) < refused or fake.in_flight < 3)
            and fake.in_flight <= 3  # more got in already: no use waiting for the refusals
            and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        time.sleep(0.3)  # would a fourth request still reach the upstream?
        finished = [f.result() for f in futures if f.done()]
        assert [r.status for r in finished] == [429] * refused, [r.status for r in finished]
        assert {r.body["error"]["type"] for r in finished} == {"requests"}
        assert "max_concurrent 3" in finished[0].body["error"]["message"]
        assert fake.in_flight == 3
        assert fake.max_in_flight == 3
    finally:
        fake.release.set()
    replies = [f.result(timeout=60) for f in futures]
    assert sorted(r.status for r in replies) == [200] * 3 + [429] * (2 * PER_WORKER - 3)
    assert {c.pid for c in connections} == gateway.process.worker_pids()
    # The slots were handed back when the three ended: new requests from both workers get in.
    for connection in (connections[0], connections[-1]):
        assert connection.post(CHAT, chat(), bearer(gateway.keys["concurrent"])).status == 200


@pytest.mark.parametrize("store", STORES)
def test_a_running_request_reserves_its_tokens_against_the_other_worker(
    request: pytest.FixtureRequest, upstream: tuple[ThreadedAiohttp, FakeVllm], store: str
) -> None:
    gateway = gateway_of(request, store)
    fake = upstream[1]
    room_in_window(60, 20)
    one, other = gateway.process.connections_per_worker(1)
    assert one.pid != other.pid
    headers = bearer(gateway.keys["tpm-parallel"])
    with ThreadPoolExecutor(1) as pool:
        # A long request (up to 600 tokens) runs on one worker: it will end up using 5 + 10.
        running = pool.submit(one.post, CHAT, chat(600, hold=True, use=10), headers)
        deadline = time.monotonic() + 30
        while fake.in_flight < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            assert fake.in_flight == 1
            # Meanwhile the same 600 on the other worker would overspend tpm 1000 if both ran to the end.
            parallel = other.post(CHAT, chat(600), headers)
            assert parallel.status == 429, parallel.body
            assert parallel.body["error"]["type"] == "tokens"
        finally:
            fake.release.set()
        assert running.result(timeout=60).status == 200
    # Settled to the 15 it used: the other worker's 600 fits now.
    assert other.post(CHAT, chat(600), headers).status == 200


@pytest.mark.parametrize("store", ["sqlite", "postgres"])  # memory: no database row to look for
def test_a_key_without_limits_never_touches_the_counters(request: pytest.FixtureRequest, store: str) -> None:
    gateway = gateway_of(request, store)
    for _ in range(3):
        reply = httpx.post(
            gateway.url + CHAT,
            json=chat(),
            headers=bearer(gateway.keys["unlimited"]),
            timeout=30,
        )
        assert reply.status_code == 200, reply.text
    engine = open_engine(gateway.database)
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(LimitState.name).where(LimitState.name == "unlimited")).all()
    finally:
        engine.dispose()
    assert rows == []


# --- 429s in each API's shape ---------------------------------------------------------------------------


def test_a_spent_rpm_answers_429_in_the_openai_envelope(memory_gateway: Running) -> None:
    room_in_window(60, 10)
    headers = bearer(memory_gateway.keys["rpm-shape"])
    assert httpx.post(memory_gateway.url + CHAT, json=chat(), headers=headers, timeout=30).status_code == 200
    now = time.time()
    reply = httpx.post(memory_gateway.url + CHAT, json=chat(), headers=headers, timeout=30)
    assert reply.status_code == 429
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    reset = reset_of(reply)
    assert reset.endswith(":00Z")  # the end of the minute
    assert "rpm limit of 1" in error["message"] and f"resets at {reset}" in error["message"]
    check_retry_after(reply.headers, reset, now)


@pytest.mark.parametrize(
    ("key", "type_", "code", "limit"),
    [
        ("tpm-shape", "tokens", "rate_limit_exceeded", "tpm"),
        ("budget-shape", "insufficient_quota", "insufficient_quota", "budget_day"),
    ],
)
def test_spent_tokens_answer_429_naming_the_limit_and_its_reset(
    memory_gateway: Running, key: str, type_: str, code: str, limit: str
) -> None:
    room_in_window(60, 10)
    room_in_window(86400, 10)
    headers = bearer(memory_gateway.keys[key])
    # 5 prompt + 900 completion tokens used of 1000; the next request reserves ~25 (prompt) + 100.
    first = httpx.post(memory_gateway.url + CHAT, json=chat(900), headers=headers, timeout=30)
    assert first.status_code == 200, first.text
    now = time.time()
    reply = httpx.post(memory_gateway.url + CHAT, json=chat(100), headers=headers, timeout=30)
    assert reply.status_code == 429, reply.text
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == (type_, code)
    reset = reset_of(reply)
    assert f"{limit} limit of 1000" in error["message"] and f"resets at {reset}" in error["message"]
    assert "has used 905 tokens" in error["message"]  # settled to the real usage, not the reservation
    if limit == "budget_day":
        assert reset.endswith("T00:00:00Z")
    check_retry_after(reply.headers, reset, now)
    # A request that still fits is admitted (what is left: 1000 - 905).
    assert (
        httpx.post(memory_gateway.url + CHAT, json=chat(20), headers=headers, timeout=30).status_code == 200
    )


def test_a_request_larger_than_the_token_limit_gets_400_not_429(memory_gateway: Running) -> None:
    reply = httpx.post(
        memory_gateway.url + CHAT, json=chat(5000), headers=bearer(memory_gateway.keys["too-big"]), timeout=30
    )
    assert reply.status_code == 400  # waiting would not help: no Retry-After
    assert "retry-after" not in reply.headers
    assert "lower max_tokens" in reply.json()["error"]["message"]


def test_a_spent_rpm_on_messages_answers_429_in_the_anthropic_shape(memory_gateway: Running) -> None:
    room_in_window(60, 10)
    headers = {"x-api-key": memory_gateway.keys["messages-shape"], "anthropic-version": "2023-06-01"}
    payload = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    assert (
        httpx.post(memory_gateway.url + MESSAGES, json=payload, headers=headers, timeout=30).status_code
        == 200
    )
    now = time.time()
    reply = httpx.post(memory_gateway.url + MESSAGES, json=payload, headers=headers, timeout=30)
    assert reply.status_code == 429
    body = reply.json()
    assert set(body) == {"type", "error"} and body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error"
    assert "rpm limit of 1" in body["error"]["message"] and reset_of(reply) in body["error"]["message"]
    check_retry_after(reply.headers, reset_of(reply), now)


def test_the_openai_sdk_raises_rate_limit_error(memory_gateway: Running) -> None:
    room_in_window(60, 10)
    client = openai.OpenAI(
        base_url=memory_gateway.url + "/v1", api_key=memory_gateway.keys["openai-sdk"], max_retries=0
    )
    messages: Any = [{"role": "user", "content": "Hi"}]
    assert client.chat.completions.create(model="m", messages=messages, max_tokens=4).choices
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="m", messages=messages, max_tokens=4)
    assert raised.value.status_code == 429
    assert (raised.value.type, raised.value.code) == ("requests", "rate_limit_exceeded")
    assert "rpm limit of 1" in raised.value.message
    assert int(raised.value.response.headers["retry-after"]) >= 1


def test_the_anthropic_sdk_raises_rate_limit_error(memory_gateway: Running) -> None:
    room_in_window(60, 10)
    client = anthropic.Anthropic(
        base_url=memory_gateway.url, api_key=memory_gateway.keys["anthropic-sdk"], max_retries=0
    )
    messages: Any = [{"role": "user", "content": "Hi"}]
    assert client.messages.create(model="m", max_tokens=4, messages=messages).content
    with pytest.raises(anthropic.RateLimitError) as raised:
        client.messages.create(model="m", max_tokens=4, messages=messages)
    assert raised.value.status_code == 429
    body: Any = raised.value.body
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert "rpm limit of 1" in body["error"]["message"]
    assert int(raised.value.response.headers["retry-after"]) >= 1


# --- restarts -----------------------------------------------------------------------------------------


def test_a_spent_budget_day_stays_spent_after_the_gateway_restarts(
    upstream: tuple[ThreadedAiohttp, FakeVllm], tmp_path: Path
) -> None:
    room_in_window(86400, 120)
    store = KeyStore(tmp_path / "gw.sqlite")
    key = store.create("daily", KeyPolicy(budget_day=1000))
    store.engine.dispose()
    headers = bearer(key)
    with gateway_process(tmp_path, upstream[0].url) as first:
        assert httpx.post(first.url + CHAT, json=chat(900), headers=headers, timeout=30).status_code == 200
        spent = httpx.post(first.url + CHAT, json=chat(200), headers=headers, timeout=30)
        assert spent.status_code == 429
        assert spent.json()["error"]["type"] == "insufficient_quota"
    with gateway_process(tmp_path, upstream[0].url) as second:
        still = httpx.post(second.url + CHAT, json=chat(200), headers=headers, timeout=30)
        assert still.status_code == 429, still.text
        assert "budget_day limit of 1000" in still.json()["error"]["message"]
        assert "has used 905 tokens" in still.json()["error"]["message"]
        # What is left of the day (95 tokens) is still there.
        assert httpx.post(second.url + CHAT, json=chat(20), headers=headers, timeout=30).status_code == 200
