"""Per-key limits that hold exactly across workers and hosts: requests and tokens per minute, requests in
flight, token budgets per day and month.

Why not the ``limits`` library: its storages are per-process memory (two uvicorn workers would each admit
the full limit) or a server we would add (Redis, Memcached, MongoDB, etcd), none on SQL; and it has no
"reserve now, settle later" for token limits. The gateway already keeps keys and the ledger in one SQL
database, so each admission is one short transaction on the key's counter row there: SQLite's write lock
(``BEGIN IMMEDIATE``) or Postgres' ``SELECT ... FOR UPDATE`` makes check-and-count atomic, so N parallel
requests against a limit of k admit exactly k, budgets survive restarts, and several gateway hosts share
one Postgres. Keys without limits never touch it. The transaction runs in a thread (never on the event
loop), and a worker remembers an exhausted request window in memory until it resets, so a client that
keeps hammering a spent ``rpm`` costs no database work.

Windows are fixed and in UTC: the minute, the day, the calendar month. A request reserves its prompt
estimate + ``max_tokens`` against ``tpm`` and the budgets when admitted; ``settle`` replaces the
reservation with the real usage when the request ends, and releases its in-flight slot.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection, Engine

from serve.gateway.keys import KeyPolicy
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
                f"than key {name!r}'s {self.limit} of {self.value}: lower max_tokens."
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


@dataclass(frozen=True)
class Reservation:
    """What an admitted request holds until ``settle``."""

    name: str
    request_id: str
    tokens: int
    minute: int
    day: int
    month: int
    slot: bool

    @property
    def needs_settle(self) -> bool:
        return self.tokens > 0 or self.slot


def windows(now: float) -> tuple[int, int, int]:
    """``(epoch minute, epoch day, year * 12 + month - 1)`` of ``now`` (epoch seconds, UTC)."""
    month = datetime.fromtimestamp(now, UTC)
    return int(now // 60), int(now // 86400), month.year * 12 + month.month - 1


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


class Limiter:
    """Admission and settlement against the shared counters.

    Args:
        engine: the gateway's database.
        in_flight_ttl_s: how long an in-flight slot counts if its worker dies before releasing it (the
            longest a request may run).
    """

    def __init__(self, engine: Engine, in_flight_ttl_s: float) -> None:
        self.engine = engine
        self.in_flight_ttl_s = in_flight_ttl_s
        self._spent_rpm: dict[str, tuple[float, Denial]] = {}

    def _check(
        self, connection: Connection, name: str, policy: KeyPolicy, tokens: int, now: float
    ) -> tuple[Denial | None, dict[str, int]]:
        minute, day, month = windows(now)
        row = connection.execute(select(LimitState).where(LimitState.name == name).with_for_update()).one()
        req = row.minute_requests if row.minute == minute else 0
        tok = row.minute_tokens if row.minute == minute else 0
        day_tok = row.day_tokens if row.day == day else 0
        month_tok = row.month_tokens if row.month == month else 0
        next_minute = (minute + 1) * 60.0
        checks = (
            ("rpm", policy.rpm, req, 1, next_minute),
            ("tpm", policy.tpm, tok, tokens, next_minute),
            ("budget_day", policy.budget_day, day_tok, tokens, (day + 1) * 86400.0),
            ("budget_month", policy.budget_month, month_tok, tokens, _month_start(month + 1)),
        )
        for limit, value, used, needed, resets in checks:
            if value is not None and used + needed > value:
                return Denial(limit, value, used, needed, resets), {}
        if policy.max_concurrent is not None:
            running = connection.execute(
                select(func.count()).where(InFlight.name == name, InFlight.expires_at > now)
            ).scalar_one()
            if running >= policy.max_concurrent:
                return Denial("max_concurrent", policy.max_concurrent, running, 1, now + 1), {}
        values = {
            "minute": minute,
            "minute_requests": req + 1,
            "minute_tokens": tok + tokens,
            "day": day,
            "day_tokens": day_tok + tokens,
            "month": month,
            "month_tokens": month_tok + tokens,
        }
        return None, values

    def admit(
        self, name: str, policy: KeyPolicy, request_id: str, tokens: int, now: float | None = None
    ) -> Reservation | Denial:
        """Check and count one request of key ``name`` (blocking: call it in a thread).

        Args:
            name: the key's name (counters are per name).
            policy: its limits.
            request_id: unique id of the request (its in-flight slot).
            tokens: tokens to reserve (prompt estimate + max_tokens); counted only when the key has
                ``tpm`` or a budget.

        Returns:
            A ``Reservation`` to ``settle`` later, or the ``Denial`` of the first limit exceeded.
        """
        now = time.time() if now is None else now
        spent = self._spent_rpm.get(name)
        if spent is not None and now < spent[0]:
            return spent[1]
        counts_tokens = (
            policy.tpm is not None or policy.budget_day is not None or policy.budget_month is not None
        )
        tokens = tokens if counts_tokens else 0
        with self.engine.begin() as connection:
            _insert_ignore(connection, name)
            denial, values = self._check(connection, name, policy, tokens, now)
            if denial is not None:
                if denial.limit == "rpm":  # a request window only fills up: remember it until it resets
                    self._spent_rpm[name] = (denial.resets_at, denial)
                return denial
            connection.execute(update(LimitState).where(LimitState.name == name).values(**values))
            slot = policy.max_concurrent is not None
            if slot:
                connection.execute(
                    insert(InFlight).values(
                        request_id=request_id, name=name, expires_at=now + self.in_flight_ttl_s
                    )
                )
        return Reservation(name, request_id, tokens, values["minute"], values["day"], values["month"], slot)

    def settle(self, reservation: Reservation, used_tokens: int, now: float | None = None) -> None:
        """Replace the reservation by ``used_tokens`` and release the in-flight slot (blocking).

        A window that rolled over since admission gets the real usage; the old window's reservation
        stays where it was counted.
        """
        if not reservation.needs_settle:
            return
        now = time.time() if now is None else now
        minute, day, month = windows(now)
        with self.engine.begin() as connection:
            if reservation.tokens or used_tokens:
                row = connection.execute(
                    select(LimitState).where(LimitState.name == reservation.name).with_for_update()
                ).one()
                values: dict[str, int] = {}
                for window, current, counter, held in (
                    ("minute", minute, "minute_tokens", reservation.minute),
                    ("day", day, "day_tokens", reservation.day),
                    ("month", month, "month_tokens", reservation.month),
                ):
                    if getattr(row, window) == current == held:
                        values[counter] = max(0, getattr(row, counter) + used_tokens - reservation.tokens)
                    elif getattr(row, window) == current:
                        values[counter] = getattr(row, counter) + used_tokens
                    else:
                        values[window] = current
                        values[counter] = used_tokens
                        if window == "minute":
                            values["minute_requests"] = 0
                connection.execute(
                    update(LimitState).where(LimitState.name == reservation.name).values(**values)
                )
            if reservation.slot:
                connection.execute(delete(InFlight).where(InFlight.request_id == reservation.request_id))

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
