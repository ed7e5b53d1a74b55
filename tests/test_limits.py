"""Per-key limits on their own (``serve.gateway.limits``), in each store the gateway can count them in:
memory shared by one host's workers (``LocalLimiter`` over ``SharedCounters``, the default), SQLite and a
real PostgreSQL (``Limiter``, for several hosts sharing a database). Limits hold exactly under
concurrency, reserve tokens up front and settle to real usage, roll over with their UTC windows, survive
a restart, and say what was exceeded and when it resets (issue #8, section 1).

Time is passed explicitly (``now=``), so no test depends on the clock or on where in a minute it runs.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select

from serve.gateway import limits
from serve.gateway.keys import KeyPolicy
from serve.gateway.limits import Denial, Limiter, LocalLimiter, Reservation, windows
from serve.gateway.shared_counters import SharedCounters, Window
from serve.gateway.store import InFlight, LedgerRow, LimitState, open_engine
from serve.gateway.usage_report import usage_in_windows
from tests.postgres import new_database

TTL_S = 3600.0  # in-flight TTL of the SQL limiter, for tests that do not test the TTL itself
SLOW_S = 0.002  # how long the slowed critical section sleeps (see slow_critical_sections)
Any_Limiter = Limiter | LocalLimiter


def at(iso: str) -> float:
    """Epoch seconds of an ISO UTC time, e.g. ``at("2025-03-15T12:00:10")``."""
    return datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp()


# Ten seconds into a minute, mid-month: +49 s is the same minute, +50 s the next; same day and month.
NOON = at("2025-03-15T12:00:10")


def rid() -> str:
    return uuid.uuid4().hex


@contextmanager
def fresh_database(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """SQLAlchemy URL of an empty database: a SQLite file, or a new database on the session's PostgreSQL
    server (dropped afterwards), so no test sees another's counters."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'limits.sqlite'}"
        return
    with new_database(request.getfixturevalue("postgres_url"), "limits") as url:
        yield url


@dataclass
class Store:
    """One place the limits count in, and the workers (limiters) attached to it.

    Attributes:
        kind: ``memory``, ``sqlite`` or ``postgres``.
        path: the shared counters file (memory) or the database URL.
    """

    kind: str
    path: str
    opened: list[Any] = field(default_factory=list)

    def worker(self, in_flight_ttl_s: float = TTL_S) -> Any_Limiter:
        """A new limiter on this store, as another gateway worker (or host) would attach it. Memory:
        its own ``SharedCounters`` (own file descriptor, so the lock excludes other threads' instances
        the way it excludes other processes). SQL: its own engine."""
        if self.kind == "memory":
            counters = SharedCounters(Path(self.path))
            self.opened.append(counters)
            return LocalLimiter(counters)
        engine = open_engine(self.path)
        self.opened.append(engine)
        return Limiter(engine, in_flight_ttl_s)

    def window(self, name: str) -> Window:
        """The key's counters as stored: ``(minute, minute requests, minute tokens, day, day tokens,
        month, month tokens)``."""
        if self.kind == "memory":
            # An attached instance of this process: a new one closed here would free the worker slot
            # this process's instances share, and with it their requests in flight.
            counters = next((c for c in self.opened if isinstance(c, SharedCounters)), None)
            if counters is None:
                counters = SharedCounters(Path(self.path))
                self.opened.append(counters)
            with counters.locked():
                return counters.read(name)
        engine = open_engine(self.path)
        try:
            with engine.connect() as connection:
                row = connection.execute(select(LimitState).where(LimitState.name == name)).one()
            return (
                row.minute,
                row.minute_requests,
                row.minute_tokens,
                row.day,
                row.day_tokens,
                row.month,
                row.month_tokens,
            )
        finally:
            engine.dispose()

    def close(self) -> None:
        for item in self.opened:
            if isinstance(item, SharedCounters):
                item.close()
            else:
                item.dispose()


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "memory":
        store = Store("memory", str(tmp_path / "run" / "limits.counters"))
        yield store
        store.close()
        return
    with fresh_database(request.param, tmp_path, request) as url:
        store = Store(request.param, url)
        yield store
        store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def sql_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The SQL stores only, for what only they do (a TTL on in-flight slots, a new engine on restart)."""
    with fresh_database(request.param, tmp_path, request) as url:
        store = Store(request.param, url)
        yield store
        store.close()


@pytest.fixture
def limiter(store: Store) -> Any_Limiter:
    return store.worker()


@pytest.fixture
def slow_critical_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sleep inside each store's check-and-count, after reading the counters and before writing them
    back: the window in which a missing lock lets two admissions read the same count is then
    milliseconds wide instead of microseconds, so over-admission would actually happen, not only in
    theory. With the lock, the other admissions wait it out. Every store decides through
    ``limits.evaluate`` between its read and its write, so that is where the sleep goes."""
    evaluate = limits.evaluate

    def slow_evaluate(*args: Any) -> Any:
        decided = evaluate(*args)
        time.sleep(SLOW_S)
        return decided

    monkeypatch.setattr(limits, "evaluate", slow_evaluate)


def admitted(result: Reservation | Denial) -> Reservation:
    """``result`` as a reservation, failing with the denial if it is one."""
    assert isinstance(result, Reservation), f"denied: {result}"
    return result


def denied(result: Reservation | Denial, limit: str) -> Denial:
    """``result`` as a denial of ``limit``."""
    assert isinstance(result, Denial), f"admitted: {result}"
    assert result.limit == limit, result
    return result


# --- exactness under concurrency ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "tokens", "expected", "limit"),
    [
        (KeyPolicy(rpm=5), 100, 5, "rpm"),
        (KeyPolicy(max_concurrent=3), 100, 3, "max_concurrent"),
        (KeyPolicy(tpm=550), 100, 5, "tpm"),  # 5 reservations of 100 fit in 550, a sixth does not
        (KeyPolicy(budget_day=350), 100, 3, "budget_day"),
        (KeyPolicy(budget_month=250), 100, 2, "budget_month"),
    ],
    ids=["rpm", "max_concurrent", "tpm", "budget_day", "budget_month"],
)
@pytest.mark.usefixtures("slow_critical_sections")
def test_parallel_requests_against_a_limit_of_k_admit_exactly_k(
    request: pytest.FixtureRequest, store: Store, policy: KeyPolicy, tokens: int, expected: int, limit: str
) -> None:
    # 16 threads, each its own worker on the store, start their admission at the same moment.
    threads = 16
    workers = [store.worker() for _ in range(threads)]
    start = threading.Barrier(threads)

    def one(i: int) -> Reservation | Denial:
        start.wait(timeout=60)
        return workers[i].admit("team", policy, rid(), tokens, now=NOON)

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(one, range(threads)))

    reservations = [r for r in results if isinstance(r, Reservation)]
    denials = [r for r in results if isinstance(r, Denial)]
    assert len(reservations) == expected, results
    assert len(denials) == threads - expected
    assert {d.limit for d in denials} == {limit}
    minute, requests, minute_tokens, _, day_tokens, _, month_tokens = store.window("team")
    assert (minute, requests) == (int(NOON // 60), expected)  # a denial counts nothing
    counted = expected * tokens if policy.tpm or policy.budget_day or policy.budget_month else 0
    assert minute_tokens == day_tokens == month_tokens == counted
    if store.kind != "memory" and policy.max_concurrent is not None:
        engine = open_engine(store.path)
        with engine.connect() as connection:
            slots = connection.execute(select(InFlight.request_id).where(InFlight.name == "team")).all()
        engine.dispose()
        assert {s.request_id for s in slots} == {r.slot_id for r in reservations}
        assert all(r.slot_id.startswith(f"{r.request_id}:") for r in reservations if r.slot_id)


def test_keys_sharing_a_store_are_counted_apart(limiter: Any_Limiter) -> None:
    policy = KeyPolicy(rpm=1)
    admitted(limiter.admit("alice", policy, rid(), 0, now=NOON))
    admitted(limiter.admit("bob", policy, rid(), 0, now=NOON))
    denied(limiter.admit("alice", policy, rid(), 0, now=NOON + 1), "rpm")


# --- reserve up front, settle to real usage ------------------------------------------------------------


@pytest.mark.parametrize("limit", ["tpm", "budget_day", "budget_month"])
def test_tokens_are_reserved_up_front_and_settled_to_real_usage(store: Store, limit: str) -> None:
    policy = KeyPolicy(**{limit: 1000})
    one, other = store.worker(), store.worker()
    long_request = admitted(one.admit("team", policy, rid(), 800, now=NOON))
    assert long_request.tokens == 800
    # While it runs, its 800 reserved tokens block a parallel request of 800 on another worker.
    blocked = denied(other.admit("team", policy, rid(), 800, now=NOON + 1), limit)
    assert (blocked.used, blocked.requested, blocked.value) == (800, 800, 1000)
    assert not blocked.never_fits
    # It ends having used 100: the reservation becomes 100, and a new 800 fits.
    one.settle(long_request, 100, now=NOON + 2)
    assert store.window("team")[2] == 100
    second = admitted(other.admit("team", policy, rid(), 800, now=NOON + 3))
    window = store.window("team")
    assert (window[2], window[4], window[6]) == (900, 900, 900)
    # Using more than reserved counts what was used.
    other.settle(second, 850, now=NOON + 4)
    assert store.window("team")[4] == 950


def test_settling_releases_the_in_flight_slot(request: pytest.FixtureRequest, store: Store) -> None:
    policy = KeyPolicy(max_concurrent=1)
    one, other = store.worker(), store.worker()
    first = admitted(one.admit("team", policy, rid(), 10, now=NOON))
    busy = denied(other.admit("team", policy, rid(), 10, now=NOON + 1), "max_concurrent")
    assert (busy.used, busy.value) == (1, 1)
    one.settle(first, 5, now=NOON + 2)
    admitted(other.admit("team", policy, rid(), 10, now=NOON + 3))


def test_requests_that_share_a_client_request_id_hold_a_slot_each(store: Store) -> None:
    # A client may send its own x-request-id, and the same one twice (a retry, a fixed header). Two such
    # requests in flight hold two slots, and each settle frees its own.
    policy = KeyPolicy(max_concurrent=2)
    one, other = store.worker(), store.worker()
    first = admitted(one.admit("team", policy, "client-id-1", 10, now=NOON))
    second = admitted(other.admit("team", policy, "client-id-1", 10, now=NOON + 1))
    denied(one.admit("team", policy, rid(), 10, now=NOON + 2), "max_concurrent")
    one.settle(first, 5, now=NOON + 3)
    third = admitted(one.admit("team", policy, rid(), 10, now=NOON + 4))
    denied(other.admit("team", policy, rid(), 10, now=NOON + 5), "max_concurrent")  # second still holds one
    other.settle(second, 5, now=NOON + 6)
    one.settle(third, 5, now=NOON + 7)
    admitted(one.admit("team", policy, rid(), 10, now=NOON + 8))
    admitted(other.admit("team", policy, rid(), 10, now=NOON + 9))


def test_keys_without_token_limits_reserve_no_tokens(store: Store, limiter: Any_Limiter) -> None:
    reservation = admitted(limiter.admit("team", KeyPolicy(rpm=10), rid(), 5000, now=NOON))
    assert reservation.tokens == 0
    assert not reservation.needs_settle  # rpm only: nothing to hand back when the request ends
    assert store.window("team")[1:3] == (1, 0)


def test_a_settle_after_the_window_rolled_over_counts_the_usage_in_the_new_window(
    store: Store, limiter: Any_Limiter
) -> None:
    policy = KeyPolicy(tpm=1000)
    running = admitted(limiter.admit("team", policy, rid(), 900, now=NOON))
    limiter.settle(running, 300, now=NOON + 60)  # it ended in the next minute
    assert store.window("team")[:3] == (int((NOON + 60) // 60), 0, 300)
    denied(limiter.admit("team", policy, rid(), 800, now=NOON + 61), "tpm")
    admitted(limiter.admit("team", policy, rid(), 700, now=NOON + 62))


# --- windows roll over in UTC --------------------------------------------------------------------------


def test_the_next_minute_resets_rpm_and_tpm(limiter: Any_Limiter) -> None:
    rpm, tpm = KeyPolicy(rpm=2), KeyPolicy(tpm=100)
    admitted(limiter.admit("r", rpm, rid(), 0, now=NOON))
    admitted(limiter.admit("r", rpm, rid(), 0, now=NOON + 1))
    admitted(limiter.admit("t", tpm, rid(), 100, now=NOON))
    # Still 12:00:59: the same window.
    spent = denied(limiter.admit("r", rpm, rid(), 0, now=NOON + 49), "rpm")
    assert spent.resets_at == at("2025-03-15T12:01")
    denied(limiter.admit("t", tpm, rid(), 1, now=NOON + 49), "tpm")
    # 12:01:00.
    admitted(limiter.admit("r", rpm, rid(), 0, now=NOON + 50))
    admitted(limiter.admit("t", tpm, rid(), 100, now=NOON + 50))


def test_the_next_utc_day_resets_budget_day_and_not_before(limiter: Any_Limiter) -> None:
    policy = KeyPolicy(budget_day=1000)
    admitted(limiter.admit("team", policy, rid(), 1000, now=at("2025-03-15T00:00:00")))
    # A new minute, or a new hour, is not a new day.
    over = denied(limiter.admit("team", policy, rid(), 1, now=at("2025-03-15T23:59:59")), "budget_day")
    assert over.resets_at == at("2025-03-16T00:00")
    admitted(limiter.admit("team", policy, rid(), 1000, now=at("2025-03-16T00:00:00")))


def test_the_next_month_resets_budget_month_and_a_new_day_does_not(limiter: Any_Limiter) -> None:
    policy = KeyPolicy(budget_month=1000)
    admitted(limiter.admit("team", policy, rid(), 1000, now=at("2025-02-03T10:00")))
    over = denied(limiter.admit("team", policy, rid(), 1, now=at("2025-02-28T23:59:59")), "budget_month")
    assert over.resets_at == at("2025-03-01T00:00")
    admitted(limiter.admit("team", policy, rid(), 1000, now=at("2025-03-01T00:00")))
    # December rolls into January of the next year.
    admitted(limiter.admit("dec", policy, rid(), 1000, now=at("2025-12-31T23:00")))
    over = denied(limiter.admit("dec", policy, rid(), 1, now=at("2025-12-31T23:59")), "budget_month")
    assert over.resets_at == at("2026-01-01T00:00")
    admitted(limiter.admit("dec", policy, rid(), 1000, now=at("2026-01-01T00:00")))


# --- restarts and dead workers ----------------------------------------------------------------------


def test_sql_budgets_survive_a_new_limiter_on_the_same_database(sql_store: Store) -> None:
    policy = KeyPolicy(budget_day=1000, budget_month=1500)
    before = sql_store.worker()
    reservation = admitted(before.admit("team", policy, rid(), 900, now=NOON))
    before.settle(reservation, 700, now=NOON + 5)
    sql_store.close()  # the gateway stops

    after = sql_store.worker()  # a new process with its own engine
    over = denied(after.admit("team", policy, rid(), 400, now=NOON + 3600), "budget_day")
    assert over.used == 700
    admitted(after.admit("team", policy, rid(), 300, now=NOON + 3601))
    # The next day has a fresh day budget, but the month remembers the 1000 used: 500 are left.
    tomorrow = NOON + 86400
    assert denied(after.admit("team", policy, rid(), 600, now=tomorrow), "budget_month").used == 1000
    admitted(after.admit("team", policy, rid(), 500, now=tomorrow))


def _ledger_row(key: str, when: float, tokens: int, outcome: str = "ok") -> dict[str, Any]:
    """A ``usage_ledger`` row of ``tokens`` (prompt 10 + the rest completion) at ``when``."""
    return {
        "request_id": rid(),
        "created_at": datetime.fromtimestamp(when, UTC),
        "key_name": key,
        "model": "m",
        "route": "/v1/chat/completions",
        "status": 200 if outcome == "ok" else 429,
        "outcome": outcome,
        "stream": False,
        "prompt_tokens": 10 if tokens else 0,
        "completion_tokens": max(0, tokens - 10),
        "reasoning_tokens": 0,
        "cached_tokens": 0,
        "latency_ms": 1.0,
        "ttft_ms": None,
        "finish_reason": "stop" if tokens else None,
        "policy_id": None,
    }


def test_memory_budgets_survive_a_restart_through_the_ledger(tmp_path: Path) -> None:
    """A new start creates the counters file afresh, seeded from the usage ledger (what ``create_app``
    does): what the key used this day and month still counts, refused requests do not."""
    engine = open_engine(f"sqlite:///{tmp_path / 'gw.sqlite'}")
    rows = [
        _ledger_row("team", at("2025-03-01T08:00"), 300),  # this month, an earlier day
        _ledger_row("team", at("2025-03-15T09:00"), 500),  # today
        _ledger_row("team", at("2025-03-15T12:00:05"), 100),  # this minute
        _ledger_row("team", at("2025-03-15T12:00:06"), 0, outcome="rejected"),  # a 429: counted nothing
        _ledger_row("team", at("2025-02-28T23:00"), 5000),  # last month
        _ledger_row("other", at("2025-03-15T12:00:07"), 50),
    ]
    with engine.begin() as connection:
        connection.execute(insert(LedgerRow), rows)
    counters = SharedCounters(
        tmp_path / "run" / "limits.counters",
        seed=lambda: usage_in_windows(engine, NOON),
        windows=windows(NOON),
    )
    try:
        limiter = LocalLimiter(counters)
        with counters.locked():
            assert counters.read("team") == (
                int(NOON // 60),
                1,
                100,
                int(NOON // 86400),
                600,
                2025 * 12 + 2,
                900,
            )
        policy = KeyPolicy(rpm=2, budget_day=1000, budget_month=1200)
        denied(limiter.admit("team", policy, rid(), 401, now=NOON + 1), "budget_day")
        over = denied(limiter.admit("team", policy, rid(), 301, now=NOON + 2), "budget_month")
        assert over.used == 900
        admitted(limiter.admit("team", policy, rid(), 300, now=NOON + 3))
        # The minute's one request was seeded too: rpm 2 leaves room for one, which was just taken.
        denied(limiter.admit("team", policy, rid(), 0, now=NOON + 4), "rpm")
    finally:
        counters.close()
        engine.dispose()


def test_an_in_flight_slot_of_a_dead_worker_stops_counting_after_its_ttl(sql_store: Store) -> None:
    policy = KeyPolicy(max_concurrent=1)
    dead = sql_store.worker(in_flight_ttl_s=30)
    admitted(dead.admit("team", policy, rid(), 0, now=NOON))  # never settled: its worker died
    alive = sql_store.worker(in_flight_ttl_s=30)
    denied(alive.admit("team", policy, rid(), 0, now=NOON + 29), "max_concurrent")
    admitted(alive.admit("team", policy, rid(), 0, now=NOON + 31))


_WORKER = """
import os, sys
from pathlib import Path
from serve.gateway.keys import KeyPolicy
from serve.gateway.limits import LocalLimiter, Reservation
from serve.gateway.shared_counters import SharedCounters
limiter = LocalLimiter(SharedCounters(Path(sys.argv[1])))
if sys.argv[2] == "admit-and-die":
    result = limiter.admit("team", KeyPolicy(max_concurrent=1), "r1", 0)
    assert isinstance(result, Reservation), result
    os._exit(0)  # no settle, no close: as a worker killed mid-request
if sys.argv[2] == "lock-and-die":
    limiter.counters.lock()
    os._exit(0)  # killed inside the critical section: the lock is never given back
if sys.argv[2] == "admit":
    result = limiter.admit("team", KeyPolicy(rpm=5), "r2", 0)
    assert isinstance(result, Reservation), result
"""


def _worker_process(path: Path, action: str, timeout_s: float = 120) -> None:
    """Run a gateway worker's limiter in a separate process (its own pid) doing ``action``."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_WORKER), str(path), action],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr


def test_a_worker_that_dies_holding_the_lock_does_not_stop_the_others(tmp_path: Path) -> None:
    path = tmp_path / "run" / "limits.counters"
    _worker_process(path, "lock-and-die")
    # A lock that died with its holder would stop every limited request of every worker (here: the next
    # worker would time out). flock is let go when its process exits; a lock in shared memory (a
    # semaphore, a plain mutex) would not be.
    _worker_process(path, "admit", timeout_s=60)
    here = LocalLimiter(SharedCounters(path))
    try:
        admitted(here.admit("team", KeyPolicy(rpm=5), rid(), 0))
        with here.counters.locked():
            assert here.counters.read("team")[1] == 2  # both requests counted
    finally:
        here.counters.close()


def test_an_in_flight_slot_of_a_dead_worker_is_cleared_when_its_replacement_attaches(tmp_path: Path) -> None:
    path = tmp_path / "run" / "limits.counters"
    policy = KeyPolicy(max_concurrent=1)
    here = LocalLimiter(SharedCounters(path))  # a live worker (this process), attached first
    _worker_process(path, "admit-and-die")
    try:
        # The dead worker's request still counts: nothing has noticed it died.
        denied(here.admit("team", policy, rid(), 0), "max_concurrent")
        # uvicorn starts a replacement worker, which takes the dead one's slot and clears it.
        _worker_process(path, "attach")
        admitted(here.admit("team", policy, rid(), 0))
    finally:
        here.counters.close()


# --- worker-local leases (LocalLimiter) -----------------------------------------------------------------

BIG = KeyPolicy(rpm=100_000, tpm=10_000_000, max_concurrent=1000, budget_day=10**9, budget_month=10**10)


def _memory_workers(tmp_path: Path, count: int) -> list[LocalLimiter]:
    path = tmp_path / "run" / "limits.counters"
    return [LocalLimiter(SharedCounters(path)) for _ in range(count)]


def _close(workers: list[LocalLimiter]) -> None:
    for worker in workers:
        worker.counters.close()


def test_a_key_far_from_its_limits_is_admitted_from_a_lease_counted_up_front(tmp_path: Path) -> None:
    (one,) = workers = _memory_workers(tmp_path, 1)
    try:
        first = admitted(one.admit("team", BIG, rid(), 100, now=NOON))
        assert first.lease is None  # decided on the shared counters, which then lent the worker a share
        with one.counters.locked():
            leased = one.counters.read("team")
            running = one.counters.in_flight_of(one.counters.offsets("team")[2])
        # The lease is counted as used: 64 requests, the tokens of 64 such requests, 64 slots.
        assert leased[1:3] == (1 + limits.LEASE_REQUESTS, 100 + 100 * limits.LEASE_TOKEN_REQUESTS)
        assert running == 1 + limits.LEASE_REQUESTS
        for _ in range(10):
            assert admitted(one.admit("team", BIG, rid(), 100, now=NOON + 1)).lease is not None
        with one.counters.locked():
            assert one.counters.read("team") == leased  # spent locally: the shared counters untouched
    finally:
        _close(workers)


def test_settled_and_given_back_leases_leave_exactly_the_real_usage_counted(tmp_path: Path) -> None:
    (one,) = workers = _memory_workers(tmp_path, 1)
    try:
        reservations = [admitted(one.admit("team", BIG, rid(), 100, now=NOON + i / 100)) for i in range(40)]
        assert sum(r.lease is not None for r in reservations) >= 30
        for reservation in reservations:
            one.settle(reservation, 40, now=NOON + 1)  # each used 40 of the 100 it reserved
        one.give_back_all()
        with one.counters.locked():
            window = one.counters.read("team")
            running = one.counters.in_flight_of(one.counters.offsets("team")[2])
        assert window[1:3] == (40, 40 * 40)
        assert (window[4], window[6]) == (40 * 40, 40 * 40)
        assert running == 0
    finally:
        _close(workers)


def test_requests_of_a_lease_given_back_since_settle_into_the_current_one_without_the_lock(
    tmp_path: Path,
) -> None:
    # Under load a worker's lease runs out while requests admitted from it are still running; they end
    # after it was given back and replaced. They settle into the current lease (what they hold is
    # counted in the shared counters, as the lease is), not under the lock one by one.
    (one,) = workers = _memory_workers(tmp_path, 1)
    try:
        count = 3 * limits.LEASE_REQUESTS
        reservations = [admitted(one.admit("team", BIG, rid(), 100, now=NOON)) for _ in range(count)]
        assert len({id(r.lease) for r in reservations if r.lease is not None}) >= 2  # leases were replaced
        with one.counters.locked():
            before = one.counters.read("team")
        one.counters.lock = None  # type: ignore[method-assign]  # a settle that takes the lock fails
        for reservation in reservations:
            one.settle(reservation, 40, now=NOON + 1)
        del one.counters.lock
        with one.counters.locked():
            assert one.counters.read("team") == before
        one.give_back_all()
        with one.counters.locked():
            window = one.counters.read("team")
            running = one.counters.in_flight_of(one.counters.offsets("team")[2])
        assert window[1:3] == (count, count * 40)
        assert running == 0
    finally:
        _close(workers)


def test_an_idle_lease_goes_back_on_the_next_tick(tmp_path: Path) -> None:
    (one,) = workers = _memory_workers(tmp_path, 1)
    try:
        one.settle(admitted(one.admit("team", BIG, rid(), 100, now=NOON)), 100, now=NOON)
        one.tick(now=NOON + limits.LEASE_IDLE_S / 2)
        with one.counters.locked():
            assert one.counters.read("team")[1] > 1  # still lent
        one.tick(now=NOON + limits.LEASE_IDLE_S + 0.01)
        with one.counters.locked():
            assert one.counters.read("team")[1:3] == (1, 100)
    finally:
        _close(workers)


def test_a_lease_of_another_worker_is_recalled_so_a_limit_of_k_still_admits_exactly_k(tmp_path: Path) -> None:
    # One worker takes a lease and then gets no more requests; the other admits until the key is spent.
    # Near the limit, a request that only the idle worker's lease refuses asks for it back and is decided
    # again once it is returned: all k are admitted, never more.
    policy = KeyPolicy(rpm=1000)
    idle, busy = workers = _memory_workers(tmp_path, 2)
    try:
        admitted(idle.admit("team", policy, rid(), 0, now=NOON))
        assert idle._leases  # it holds a lease
        count, recalls = 1, 0
        while True:
            result = busy.admit("team", policy, rid(), 0, now=NOON)
            if isinstance(result, Denial) and result.recalled:
                recalls += 1
                idle.tick(now=NOON)  # what the idle worker's app does every RECALL_POLL_S
                result = busy.admit("team", policy, rid(), 0, now=NOON)
            if isinstance(result, Denial):
                assert not result.recalled
                break
            count += 1
        assert count == 1000
        assert recalls == 1
        assert not idle._leases
    finally:
        _close(workers)


def test_admit_async_waits_for_a_recalled_lease_and_admits(tmp_path: Path) -> None:
    policy = KeyPolicy(budget_month=1000)  # 100 requests of 10 tokens
    holder, asker = workers = _memory_workers(tmp_path, 2)

    async def run() -> int:
        stop = asyncio.Event()

        async def ticking() -> None:  # the holder's app
            while not stop.is_set():
                await asyncio.sleep(limits.RECALL_POLL_S)
                holder.tick()

        ticker = asyncio.ensure_future(ticking())
        admitted(holder.admit("team", policy, rid(), 10))  # holds a lease of an eighth of what is left
        got = 1
        while isinstance(await asker.admit_async("team", policy, rid(), 10), Reservation):
            got += 1
        stop.set()
        await ticker
        return got

    try:
        assert asyncio.run(run()) == 100
    finally:
        _close(workers)


# --- what a denial says ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "tokens", "value", "reset"),
    [
        (KeyPolicy(rpm=1), 0, 1, "2025-03-15T12:01:00Z"),
        (KeyPolicy(tpm=500), 400, 500, "2025-03-15T12:01:00Z"),
        (KeyPolicy(budget_day=700), 400, 700, "2025-03-16T00:00:00Z"),
        (KeyPolicy(budget_month=900), 500, 900, "2025-04-01T00:00:00Z"),
    ],
    ids=["rpm", "tpm", "budget_day", "budget_month"],
)
def test_the_denial_message_names_the_limit_its_value_and_the_reset_time(
    limiter: Any_Limiter, policy: KeyPolicy, tokens: int, value: int, reset: str
) -> None:
    admitted(limiter.admit("alice", policy, rid(), tokens, now=NOON))
    denial = limiter.admit("alice", policy, rid(), tokens, now=NOON + 5)
    assert isinstance(denial, Denial)
    assert not denial.never_fits
    message = denial.message("alice", now=NOON + 5)
    assert "'alice'" in message
    assert f"{denial.limit} limit of {value}" in message
    assert f"resets at {reset}" in message
    assert datetime.fromtimestamp(denial.resets_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") == reset
    seconds_left = round(denial.resets_at - (NOON + 5))
    assert f"(in {seconds_left} s)" in message


def test_the_max_concurrent_message_names_the_limit_and_the_requests_in_flight(
    request: pytest.FixtureRequest, store: Store, limiter: Any_Limiter
) -> None:
    policy = KeyPolicy(max_concurrent=2)
    for _ in range(2):
        admitted(limiter.admit("alice", policy, rid(), 0, now=NOON))
    denial = denied(limiter.admit("alice", policy, rid(), 0, now=NOON), "max_concurrent")
    message = denial.message("alice", now=NOON)
    assert "max_concurrent 2" in message and "2 requests in flight" in message
    assert denial.resets_at > NOON  # a retry hint, never "now"


@pytest.mark.parametrize("limit", ["tpm", "budget_day", "budget_month"])
def test_a_request_larger_than_the_limit_never_fits(limiter: Any_Limiter, limit: str) -> None:
    policy = KeyPolicy(**{limit: 1000})
    denial = denied(limiter.admit("alice", policy, rid(), 1500, now=NOON), limit)
    assert denial.never_fits
    message = denial.message("alice", now=NOON)
    assert "1500" in message and f"{limit} of 1000" in message and "lower max_tokens" in message
    # Nothing was counted for it: a request that fits still does.
    admitted(limiter.admit("alice", policy, rid(), 1000, now=NOON))


def test_a_request_that_fits_an_empty_window_is_not_never_fits(limiter: Any_Limiter) -> None:
    policy = KeyPolicy(tpm=1000)
    admitted(limiter.admit("alice", policy, rid(), 600, now=NOON))
    assert not denied(limiter.admit("alice", policy, rid(), 600, now=NOON), "tpm").never_fits


# --- keys without limits -----------------------------------------------------------------------------------


def test_a_key_without_limits_is_not_limited() -> None:
    assert not KeyPolicy().limited
    # Caps and permissions are not counted limits: they never touch the counters.
    assert not KeyPolicy(models=("m",), max_tokens=10, clamp_max_tokens=True, max_n=1, admin=True).limited


@pytest.mark.parametrize("field_", ["rpm", "tpm", "max_concurrent", "budget_day", "budget_month"])
def test_each_counted_limit_makes_a_key_limited(field_: str) -> None:
    assert KeyPolicy(**{field_: 1}).limited
