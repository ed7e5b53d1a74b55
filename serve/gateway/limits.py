"""Per-key limits that hold exactly across workers: requests and tokens per minute, requests in flight,
token budgets per day and month.

Two stores, one rule (``evaluate``):

- ``LocalLimiter`` (the default for one gateway host): counters in memory shared by the host's workers
  (``shared_counters``), checked and counted under one lock in a few microseconds on the event loop, no
  database on the request path; a key far from its limits is admitted mostly from a worker-local lease
  of its counters, without the lock (see ``LocalLimiter``). The usage ledger is the durable store
  behind it: the counters are seeded from the ledger when the gateway starts, so day and month budgets
  survive restarts.
- ``Limiter`` (SQL; the default when ``database_url`` points at a shared database, for several gateway
  hosts): one short transaction on the key's counter row per admission and per settlement, in a thread
  (SQLite ``BEGIN IMMEDIATE``, Postgres ``SELECT ... FOR UPDATE``), exact across hosts at the cost of a
  database round trip.

Why not the ``limits`` library: its storages are per-process memory (two uvicorn workers would each
admit the full limit) or a server we would add (Redis, Memcached, MongoDB, etcd), and it has no "reserve
now, settle later" for token limits. Keys without limits touch neither store.

Windows are fixed and in UTC: the minute, the day, the calendar month. A request reserves its prompt
estimate + ``max_tokens`` against ``tpm`` and the budgets when admitted; ``settle`` replaces the
reservation with the real usage when the request ends, and releases its in-flight slot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection, Engine

from serve.gateway.keys import KeyPolicy
from serve.gateway.shared_counters import SharedCounters, Window
from serve.gateway.store import InFlight, LimitState


@dataclass(frozen=True)
class Denial:
    """A request the key's limits refuse.

    Attributes:
        limit: ``rpm``, ``tpm``, ``max_concurrent``, ``budget_day`` or ``budget_month``.
        value: the limit.
        used: what is counted in the current window (requests or tokens).
        requested: what this request needed (1 request, or its reserved tokens).
        resets_at: epoch seconds when the window resets (for ``max_concurrent``: a retry hint).
    """

    limit: str
    value: int
    used: int
    requested: int
    resets_at: float
    recalled: bool = False  # other workers hold leases of the key, asked back: decide again shortly

    @property
    def never_fits(self) -> bool:
        """The request alone is larger than the limit: waiting will not help."""
        return self.requested > self.value

    def message(self, name: str, now: float) -> str:
        """What was exceeded, by whom, and when it resets, for the error body."""
        when = datetime.fromtimestamp(self.resets_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        wait = max(0, round(self.resets_at - now))
        unit = "requests" if self.limit in {"rpm", "max_concurrent"} else "tokens"
        if self.never_fits:
            return (
                f"This request reserves {self.requested} tokens (prompt estimate + max_tokens), more "
                f"than key {name!r} allows ({self.limit} of {self.value}): lower max_tokens."
            )
        if self.limit == "max_concurrent":
            return (
                f"Key {name!r} already has {self.used} requests in flight (max_concurrent {self.value}); "
                "retry when one finishes."
            )
        return (
            f"Key {name!r} has used {self.used} {unit} of its {self.limit} limit of {self.value}; this "
            f"request needs {self.requested} more. The window resets at {when} (in {wait} s)."
        )


class Reservation(NamedTuple):
    """What an admitted request holds until ``settle`` (a tuple: one is made per request)."""

    name: str
    request_id: str
    tokens: int
    minute: int
    day: int
    month: int
    slot: bool
    lease: Lease | None = None  # the worker-local lease that admitted it (LocalLimiter; read by tests only)
    slot_id: str | None = None  # its row in the in-flight table (Limiter): the request id made unique

    @property
    def needs_settle(self) -> bool:
        return self.tokens > 0 or self.slot


@dataclass(slots=True)
class Lease:
    """A share of a key's limits that one worker took from the shared counters (where it is counted as
    used) and admits from without the lock. See ``LocalLimiter``.

    Attributes:
        policy: the key's policy it was sized for (a changed policy gives the lease back).
        generation: the key's recall generation when taken (a newer one gives it back).
        at: the offset of the key's windows in the shared counters (``SharedCounters.offsets``).
        minute / day / month: the windows it was counted in.
        requests / tokens / slots: what is left of it (``tokens`` may go below zero when requests used
            more than they reserved); ``slots`` is ``UNBOUNDED`` for a key without ``max_concurrent``.
        used_at: when it last admitted or settled (epoch seconds).
    """

    policy: KeyPolicy
    generation: int
    at: int
    minute: int
    day: int
    month: int
    requests: int
    tokens: int
    slots: int
    used_at: float


UNBOUNDED = 1 << 62
LEASE_REQUESTS = 64
"""Most requests one lease carries."""
LEASE_MIN = 8
"""Fewest requests (and tokens and slots for as many requests) a lease carries: a key with less left
than a lease of this size on each worker is admitted one request at a time."""
LEASE_SPREAD = 4
"""A lease takes at most 1 / (``LEASE_SPREAD`` x workers) of what each limit has left, so leases stop
well before a limit is reached and the last requests are admitted one by one, exactly."""
LEASE_TOKEN_REQUESTS = 64
"""A token lease covers at most this many requests the size of the one that took it."""
LEASE_IDLE_S = 0.25
"""A lease not used for this long is given back (``LocalLimiter.tick``)."""
RECALL_WAIT_S = 0.1
"""How long a request that only leases held by other workers refuse waits for them to come back."""
RECALL_POLL_S = 0.005


@functools.lru_cache(maxsize=8)
def _month_of_day(day: int) -> int:
    at = datetime.fromtimestamp(day * 86400, UTC)
    return at.year * 12 + at.month - 1


@functools.lru_cache(maxsize=4)
def _windows_of_minute(minute: int) -> tuple[int, int, int]:
    day = minute // 1440
    return minute, day, _month_of_day(day)


def windows(now: float) -> tuple[int, int, int]:
    """``(epoch minute, epoch day, year * 12 + month - 1)`` of ``now`` (epoch seconds, UTC); worked out
    once per minute."""
    return _windows_of_minute(int(now // 60))


@functools.lru_cache(maxsize=8)
def _month_start(month: int) -> float:
    return datetime(month // 12, month % 12 + 1, 1, tzinfo=UTC).timestamp()


def _insert_ignore(connection: Connection, name: str) -> None:
    """Create the key's counter row if it is missing (a no-op when another transaction just did)."""
    dialect = connection.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        connection.execute(pg_insert(LimitState).values(name=name).on_conflict_do_nothing())
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        connection.execute(sqlite_insert(LimitState).values(name=name).on_conflict_do_nothing())
    else:  # pragma: no cover - only SQLite and Postgres are supported
        if connection.execute(select(LimitState.name).where(LimitState.name == name)).first() is None:
            connection.execute(insert(LimitState).values(name=name))


_WINDOW_COLUMNS = ("minute", "minute_requests", "minute_tokens", "day", "day_tokens", "month", "month_tokens")


def _columns(window: Window) -> dict[str, int]:
    return dict(zip(_WINDOW_COLUMNS, window, strict=True))


def evaluate(
    stored: Window, policy: KeyPolicy, tokens: int, running: int, now: float
) -> tuple[Denial | None, Window]:
    """Check one request against ``policy`` and count it.

    Args:
        stored: the key's windows as stored (older windows count as empty).
        policy: the key's limits.
        tokens: tokens the request reserves (0 when the key has no token limit).
        running: the key's requests in flight now.
        now: epoch seconds.

    Returns:
        ``(denial, stored)`` when a limit refuses it, else ``(None, the windows with it counted)``.
    """
    minute, day, month = windows(now)
    old_minute, req, tok, old_day, day_tok, old_month, month_tok = stored
    if old_minute != minute:
        req = tok = 0
    if old_day != day:
        day_tok = 0
    if old_month != month:
        month_tok = 0
    # Checked in this order; the reset time is only worked out for a refusal.
    if policy.rpm is not None and req + 1 > policy.rpm:
        return Denial("rpm", policy.rpm, req, 1, (minute + 1) * 60.0), stored
    if policy.tpm is not None and tok + tokens > policy.tpm:
        return Denial("tpm", policy.tpm, tok, tokens, (minute + 1) * 60.0), stored
    if policy.budget_day is not None and day_tok + tokens > policy.budget_day:
        return Denial("budget_day", policy.budget_day, day_tok, tokens, (day + 1) * 86400.0), stored
    if policy.budget_month is not None and month_tok + tokens > policy.budget_month:
        return Denial("budget_month", policy.budget_month, month_tok, tokens, _month_start(month + 1)), stored
    if policy.max_concurrent is not None and running >= policy.max_concurrent:
        return Denial("max_concurrent", policy.max_concurrent, running, 1, now + 1), stored
    return None, (minute, req + 1, tok + tokens, day, day_tok + tokens, month, month_tok + tokens)


def settled(stored: Window, reservation: Reservation, used_tokens: int, now: float) -> Window:
    """``stored`` with the reservation replaced by ``used_tokens``. A window that rolled over since
    admission gets the real usage; the old window's reservation stays where it was counted."""
    minute, day, month = windows(now)
    old_minute, req, tok, old_day, day_tok, old_month, month_tok = stored
    change = used_tokens - reservation.tokens
    if old_minute != minute:
        req, tok = 0, used_tokens  # a new minute: no request counted in it yet
    else:
        tok = max(0, tok + change) if minute == reservation.minute else tok + used_tokens
    if old_day != day:
        day_tok = used_tokens
    else:
        day_tok = max(0, day_tok + change) if day == reservation.day else day_tok + used_tokens
    if old_month != month:
        month_tok = used_tokens
    else:
        month_tok = max(0, month_tok + change) if month == reservation.month else month_tok + used_tokens
    return (minute, req, tok, day, day_tok, month, month_tok)


class LocalLimiter:
    """Admission and settlement against counters shared in memory by this host's workers.

    Most requests of a key far from its limits are admitted from a worker-local lease: a share of each
    limit (requests, tokens, in-flight slots) taken from the shared counters under the lock, where it
    counts as used, and spent without touching them. Admitting from the shared counters on every request
    costs the gateway about 20 us of CPU per request under load (both workers write the same key's
    counters: README, "Gateway speed"), a lease a few microseconds. What a lease holds is counted, so a
    limit is never exceeded. A request that ends settles into the worker's current lease of its key
    (in the same windows), whichever lease or shared check admitted it: what it holds is counted in the
    shared counters, as the lease is (under load a lease is often replaced while its requests still
    run; settling them under the lock took it 0.93 times per request, measured 2026-12-05). Leases
    are small next to what is left (``LEASE_SPREAD``) and none is taken near a limit, where requests
    are admitted one by one as before. When only other workers' leases stand between a request and its
    admission, it asks for them back (the key's recall generation) and is
    decided again once they are returned (within ``RECALL_WAIT_S``): N parallel requests against a
    limit of k still admit exactly k. An idle lease goes back after ``LEASE_IDLE_S``; a lease of a
    worker that died stays counted until its window ends (at most ``LEASE_REQUESTS`` requests, or the
    tokens of ``LEASE_TOKEN_REQUESTS`` requests).

    Args:
        counters: the attached shared counters.
    """

    on_loop = True  # admit / settle are fast enough to call on the event loop

    def __init__(self, counters: SharedCounters) -> None:
        self.counters = counters
        self._leases: dict[str, Lease] = {}

    def admit(
        self, name: str, policy: KeyPolicy, request_id: str, tokens: int, now: float | None = None
    ) -> Reservation | Denial:
        """Check and count one request of key ``name`` (microseconds; no I/O). See ``Limiter.admit``.
        A ``Denial`` with ``recalled`` set asks the caller to decide again shortly (``admit_async``)."""
        now = time.time() if now is None else now
        tokens = tokens if policy.counts_tokens else 0
        lease = self._leases.get(name)
        if (
            lease is not None
            and lease.minute == now // 60  # the same minute: the same day and month too
            and lease.policy is policy
            and lease.requests >= 1
            and lease.tokens >= tokens
            and lease.slots >= 1
            and self.counters.generation_at(lease.at) == lease.generation
        ):
            slot = policy.max_concurrent is not None
            lease.requests -= 1
            lease.tokens -= tokens
            if slot:
                lease.slots -= 1
            lease.used_at = now
            return Reservation(name, request_id, tokens, lease.minute, lease.day, lease.month, slot, lease)
        return self._admit_shared(name, policy, request_id, tokens, now)

    def _admit_shared(
        self, name: str, policy: KeyPolicy, request_id: str, tokens: int, now: float
    ) -> Reservation | Denial:
        """Admission under the lock: give back this worker's lease of the key, decide the request on
        the shared counters, and take a new lease when the key is far from every limit."""
        slot = policy.max_concurrent is not None
        counters = self.counters
        at, mine, index = counters.offsets(name)
        counters.lock()
        try:
            lease = self._leases.pop(name, None)
            if lease is not None:
                self._give_back(lease, at, mine, index)
            running = counters.in_flight_of(index) if slot else 0
            denial, window = evaluate(counters.read_at(at), policy, tokens, running, now)
            if denial is not None:
                if not denial.never_fits and counters.lease_holders(index):  # ours went back above
                    counters.recall_at(at)
                    return dataclasses.replace(denial, recalled=True)
                return denial
            lease = self._new_lease(policy, window, running + 1, tokens, now, at)
            taken_slots = 1
            if lease is not None:
                minute, req, tok, day, day_tok, month, month_tok = window
                window = (
                    minute,
                    req + lease.requests,
                    tok + lease.tokens,
                    day,
                    day_tok + lease.tokens,
                    month,
                    month_tok + lease.tokens,
                )
                if slot:
                    taken_slots += lease.slots
                counters.add_lease_holder(index, 1)
                self._leases[name] = lease
            counters.write_at(at, window)
            if slot:
                counters.add_in_flight_at(mine, taken_slots)
        finally:
            counters.unlock()
        return Reservation(name, request_id, tokens, window[0], window[3], window[5], slot)

    def _new_lease(
        self, policy: KeyPolicy, window: Window, running: int, tokens: int, now: float, at: int
    ) -> Lease | None:
        """A lease of the key's limits as counted in ``window`` (with the request just admitted) for the
        key whose windows are at offset ``at``, or None when one of them has too little left to share
        (call under the lock)."""
        share = LEASE_SPREAD * self.counters.workers()
        minute, req, tok, day, day_tok, month, month_tok = window
        requests = LEASE_REQUESTS
        if policy.rpm is not None:
            requests = min(requests, (policy.rpm - req) // share)
        lease_tokens = 0
        if tokens:
            lease_tokens = tokens * LEASE_TOKEN_REQUESTS
            for limit, used in (
                (policy.tpm, tok),
                (policy.budget_day, day_tok),
                (policy.budget_month, month_tok),
            ):
                if limit is not None:
                    lease_tokens = min(lease_tokens, (limit - used) // share)
        slots = UNBOUNDED
        if policy.max_concurrent is not None:
            slots = min(LEASE_REQUESTS, (policy.max_concurrent - running) // share)
        if requests < LEASE_MIN or lease_tokens < tokens * LEASE_MIN or slots < LEASE_MIN:
            return None  # near a limit: one by one
        generation = self.counters.generation_at(at)
        return Lease(policy, generation, at, minute, day, month, requests, lease_tokens, slots, now)

    def _give_back(self, lease: Lease, at: int, mine: int, index: int) -> None:
        """Return what is left of ``lease`` to the shared counters (call under the lock)."""
        counters = self.counters
        minute, req, tok, day, day_tok, month, month_tok = counters.read_at(at)
        if minute == lease.minute:
            req = max(0, req - lease.requests)
            tok = max(0, tok - lease.tokens)
        if day == lease.day:
            day_tok = max(0, day_tok - lease.tokens)
        if month == lease.month:
            month_tok = max(0, month_tok - lease.tokens)
        counters.write_at(at, (minute, req, tok, day, day_tok, month, month_tok))
        if lease.policy.max_concurrent is not None and lease.slots > 0:
            counters.add_in_flight_at(mine, -lease.slots)
        counters.add_lease_holder(index, -1)

    def tick(self, now: float | None = None) -> None:
        """Give back the leases that were asked back, belong to a past window or went unused for
        ``LEASE_IDLE_S`` (the app calls this every ``RECALL_POLL_S``)."""
        if not self._leases:
            return
        now = time.time() if now is None else now
        counters = self.counters
        minute = now // 60
        for name, lease in list(self._leases.items()):
            if (
                now - lease.used_at < LEASE_IDLE_S
                and lease.minute == minute  # the same day and month too
                and counters.generation_at(lease.at) == lease.generation
            ):
                continue
            self._return(name, lease)

    def give_back_all(self) -> None:
        """Give back every lease (the worker is stopping)."""
        for name, lease in list(self._leases.items()):
            self._return(name, lease)

    def _return(self, name: str, lease: Lease) -> None:
        """Drop this worker's lease of key ``name`` and give back what is left of it, under the lock."""
        counters = self.counters
        at, mine, index = counters.offsets(name)
        counters.lock()
        try:
            del self._leases[name]
            self._give_back(lease, at, mine, index)
        finally:
            counters.unlock()

    def settle(self, reservation: Reservation, used_tokens: int, now: float | None = None) -> None:
        """Replace the reservation by ``used_tokens`` and release the in-flight slot."""
        if not reservation.needs_settle:
            return
        now = time.time() if now is None else now
        lease = self._leases.get(reservation.name)
        if (
            lease is not None
            and lease.minute == reservation.minute == now // 60  # then the same day and month too
            and (lease.policy.max_concurrent is not None) == reservation.slot
        ):
            # What the request holds is counted in the shared counters, as this lease is: handing it to
            # the lease (returned with it) counts the same as handing it back under the lock. So does a
            # request admitted from an earlier lease or the shared counters, in the same windows.
            lease.tokens += reservation.tokens - used_tokens
            if reservation.slot:
                lease.slots += 1
            lease.used_at = now
            return
        counters = self.counters
        at, mine, _ = counters.offsets(reservation.name)
        counters.lock()
        try:
            if reservation.tokens or used_tokens:
                counters.write_at(at, settled(counters.read_at(at), reservation, used_tokens, now))
            if reservation.slot:
                counters.add_in_flight_at(mine, -1)
        finally:
            counters.unlock()

    async def admit_async(
        self, name: str, policy: KeyPolicy, request_id: str, tokens: int
    ) -> Reservation | Denial:
        """``admit``, waiting up to ``RECALL_WAIT_S`` for leases asked back from other workers."""
        result = self.admit(name, policy, request_id, tokens)
        if isinstance(result, Denial) and result.recalled:
            return await self.after_recall(result, name, policy, request_id, tokens)
        return result

    async def after_recall(
        self, denial: Denial, name: str, policy: KeyPolicy, request_id: str, tokens: int
    ) -> Reservation | Denial:
        """Decide a request that ``admit`` refused with ``recalled`` set again every ``RECALL_POLL_S``,
        once the leases asked back may have come back, for up to ``RECALL_WAIT_S``."""
        result: Reservation | Denial = denial
        deadline = time.monotonic() + RECALL_WAIT_S
        while isinstance(result, Denial) and result.recalled:
            if time.monotonic() >= deadline:
                return dataclasses.replace(result, recalled=False)
            await asyncio.sleep(RECALL_POLL_S)
            result = self.admit(name, policy, request_id, tokens)
        return result

    async def settle_async(self, reservation: Reservation, used_tokens: int) -> None:
        """``settle`` (fast enough to run on the event loop)."""
        self.settle(reservation, used_tokens)


class Limiter:
    """Admission and settlement in the SQL database (exact across gateway hosts that share it).

    Args:
        engine: the gateway's database.
        in_flight_ttl_s: how long an in-flight slot counts if its worker dies before releasing it (the
            longest a request may run).
    """

    on_loop = False  # a database round trip: admit_async / settle_async run it in a thread

    def __init__(self, engine: Engine, in_flight_ttl_s: float) -> None:
        self.engine = engine
        self.in_flight_ttl_s = in_flight_ttl_s
        self._spent_rpm: dict[str, tuple[float, Denial]] = {}

    def _check(
        self, connection: Connection, name: str, policy: KeyPolicy, tokens: int, now: float
    ) -> tuple[Denial | None, Window]:
        row = connection.execute(select(LimitState).where(LimitState.name == name).with_for_update()).one()
        stored: Window = tuple(getattr(row, c) for c in _WINDOW_COLUMNS)  # type: ignore[assignment]
        running = 0
        if policy.max_concurrent is not None:
            running = connection.execute(
                select(func.count()).where(InFlight.name == name, InFlight.expires_at > now)
            ).scalar_one()
        return evaluate(stored, policy, tokens, running, now)

    def admit(
        self, name: str, policy: KeyPolicy, request_id: str, tokens: int, now: float | None = None
    ) -> Reservation | Denial:
        """Check and count one request of key ``name`` (blocking: call it in a thread).

        Args:
            name: the key's name (counters are per name).
            policy: its limits.
            request_id: the request's id; its in-flight slot's row is this id and a random suffix
                (a client may send the same ``x-request-id`` on requests in flight together).
            tokens: tokens to reserve (prompt estimate + max_tokens); counted only when the key has
                ``tpm`` or a budget.

        Returns:
            A ``Reservation`` to ``settle`` later, or the ``Denial`` of the first limit exceeded.
        """
        now = time.time() if now is None else now
        spent = self._spent_rpm.get(name)
        if spent is not None and now < spent[0]:
            return spent[1]
        tokens = tokens if policy.counts_tokens else 0
        with self.engine.begin() as connection:
            _insert_ignore(connection, name)
            denial, window = self._check(connection, name, policy, tokens, now)
            if denial is not None:
                if denial.limit == "rpm":  # a request window only fills up: remember it until it resets
                    self._spent_rpm[name] = (denial.resets_at, denial)
                return denial
            connection.execute(update(LimitState).where(LimitState.name == name).values(**_columns(window)))
            slot = policy.max_concurrent is not None
            slot_id = None
            if slot:
                slot_id = f"{request_id}:{secrets.token_hex(6)}"
                connection.execute(
                    insert(InFlight).values(
                        request_id=slot_id, name=name, expires_at=now + self.in_flight_ttl_s
                    )
                )
        return Reservation(name, request_id, tokens, window[0], window[3], window[5], slot, slot_id=slot_id)

    def settle(self, reservation: Reservation, used_tokens: int, now: float | None = None) -> None:
        """Replace the reservation by ``used_tokens`` and release the in-flight slot (blocking)."""
        if not reservation.needs_settle:
            return
        now = time.time() if now is None else now
        with self.engine.begin() as connection:
            if reservation.tokens or used_tokens:
                row = connection.execute(
                    select(LimitState).where(LimitState.name == reservation.name).with_for_update()
                ).one()
                stored: Window = tuple(getattr(row, c) for c in _WINDOW_COLUMNS)  # type: ignore[assignment]
                window = settled(stored, reservation, used_tokens, now)
                connection.execute(
                    update(LimitState).where(LimitState.name == reservation.name).values(**_columns(window))
                )
            if reservation.slot:
                connection.execute(delete(InFlight).where(InFlight.request_id == reservation.slot_id))

    async def admit_async(
        self, name: str, policy: KeyPolicy, request_id: str, tokens: int
    ) -> Reservation | Denial:
        """``admit`` off the event loop (an exhausted request window answers without a thread)."""
        spent = self._spent_rpm.get(name)
        if spent is not None and time.time() < spent[0]:
            return spent[1]
        return await asyncio.to_thread(self.admit, name, policy, request_id, tokens)

    async def settle_async(self, reservation: Reservation, used_tokens: int) -> None:
        """``settle`` off the event loop."""
        if reservation.needs_settle:
            await asyncio.to_thread(self.settle, reservation, used_tokens)
