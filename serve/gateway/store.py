"""The gateway's durable state in one SQL database: keys with their policy, limit counters, requests in
flight and the usage ledger.

SQLite (a file, the default) or Postgres (``postgresql+psycopg://...``, for several gateway hosts) through
SQLAlchemy, with the same tables and statements. SQLite runs in WAL mode (readers never wait for the one
writer) and takes its write lock at ``BEGIN`` (``BEGIN IMMEDIATE``), so a read-then-write transaction
cannot deadlock on a lock upgrade; Postgres serialises the same transactions with ``SELECT ... FOR
UPDATE`` on the key's counter row. Source for the SQLite recipe: SQLAlchemy's "Serializable isolation /
Savepoints / Transactional DDL" notes for pysqlite.
"""

from __future__ import annotations

import os
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Integer,
    String,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Seconds a connection waits for another writer's lock before giving up (SQLite busy timeout).
BUSY_TIMEOUT_S = 30


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    """One row per key ever created; revoked and expired keys stay for the record.

    Policy lives on the row; limits and budgets are counted per key *name*, so a rotated key (same name,
    new secret) keeps its counters. ``None`` means "no limit".
    """

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    key_id: Mapped[str] = mapped_column(String(8), unique=True, index=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    models: Mapped[list[str]] = mapped_column(JSON, default=lambda: ["*"])
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_concurrent: Mapped[int | None] = mapped_column(Integer, nullable=True)
    budget_day: Mapped[int | None] = mapped_column(Integer, nullable=True)
    budget_month: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    clamp_max_tokens: Mapped[bool] = mapped_column(Boolean, default=False)
    max_n: Mapped[int | None] = mapped_column(Integer, nullable=True)
    enable_thinking: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    thinking_budget: Mapped[int | None] = mapped_column(Integer, nullable=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    system_policy: Mapped[str | None] = mapped_column(String(64), nullable=True)


class LimitState(Base):
    """Per key name: the current fixed windows and what was counted in them (reservations included)."""

    __tablename__ = "key_limit_state"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    minute: Mapped[int] = mapped_column(Integer, default=0)  # epoch minute of the window below
    minute_requests: Mapped[int] = mapped_column(Integer, default=0)
    minute_tokens: Mapped[int] = mapped_column(Integer, default=0)
    day: Mapped[int] = mapped_column(Integer, default=0)  # epoch day (UTC)
    day_tokens: Mapped[int] = mapped_column(Integer, default=0)
    month: Mapped[int] = mapped_column(Integer, default=0)  # year * 12 + month - 1 (UTC)
    month_tokens: Mapped[int] = mapped_column(Integer, default=0)


class InFlight(Base):
    """One row per admitted request of a key with ``max_concurrent``, deleted when it ends. A worker
    that dies leaves its rows; they stop counting at ``expires_at`` (epoch seconds). ``request_id`` is
    the request's id and a random suffix (``<id>:<12 hex digits>``): a client may send one id twice."""

    __tablename__ = "key_in_flight"

    request_id: Mapped[str] = mapped_column(String(160), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    expires_at: Mapped[float] = mapped_column(Float)


class LedgerRow(Base):
    """One row per request on a pass-through route (401s included, with no key name).

    ``outcome``: ``ok`` (the upstream answered, whatever its status), ``rejected`` (the gateway refused:
    auth, policy, limits, size), ``client_disconnect`` (the client left before the end; tokens so far),
    ``upstream_error`` (vLLM unreachable, timed out or broke mid-stream; tokens so far), ``shutdown`` (the
    gateway stopped before the answer was complete, past its ``shutdown_timeout_s``; tokens so far),
    ``error`` (the gateway itself failed: a 500 with the request id in its log).
    """

    __tablename__ = "usage_ledger"

    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[str] = mapped_column(String(160), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    key_name: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    route: Mapped[str] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(24))
    stream: Mapped[bool] = mapped_column(Boolean)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[float] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    finish_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    policy_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    client_ip: Mapped[str | None] = mapped_column(String(64), nullable=True)


_READ_ONLY = "kit_read_only"


def reader(engine: Engine) -> Engine:
    """``engine`` for read-only transactions: on SQLite they begin deferred and never wait for a writer
    (WAL); elsewhere the same engine."""
    return engine.execution_options(**{_READ_ONLY: True})


def _sqlite_path(url: str) -> Path | None:
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def _ensure_wal(cursor: Any) -> None:
    """Put the SQLite file in WAL mode (a setting stored in the file), unless it is already.

    Switching takes an exclusive lock, and SQLite answers "database is locked" at once, without waiting
    for the busy timeout, to one of two connections that both hold a shared lock and want it (its
    deadlock rule: https://sqlite.org/c3ref/busy_handler.html). Two gateway workers opening a new file
    together did exactly that; so the mode is read first (a file already in WAL needs nothing), and a
    switch that meets the lock is retried for up to ``BUSY_TIMEOUT_S``.

    Raises:
        sqlite3.OperationalError: still locked after ``BUSY_TIMEOUT_S``, or another failure.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        mode = cursor.execute("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() == "wal":
            return
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def open_engine(url: str, *, create: bool = True) -> Engine:
    """An engine on ``url`` with the tables created (and columns added by newer versions migrated).

    Args:
        url: SQLAlchemy URL.
        create: make a missing SQLite file (mode 0600, parent folders too). When False, a missing file
            raises instead of silently starting an empty key database.

    Raises:
        FileNotFoundError: ``create`` is False and the SQLite file does not exist.
    """
    path = _sqlite_path(url)
    fresh = False
    if path is not None:
        if not path.exists():
            if not create:
                raise FileNotFoundError(str(path))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            fresh = True
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves, below
            cursor = dbapi_connection.cursor()
            _ensure_wal(cursor)
            cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps it consistent
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Any) -> None:
            # Writers take the write lock up front (no deadlock on a lock upgrade); readers (``reader``)
            # begin deferred and, in WAL mode, never wait for a writer.
            read_only = connection.get_execution_options().get(_READ_ONLY, False)
            connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")
    else:
        engine = create_engine(url, pool_pre_ping=True)
    Base.metadata.create_all(engine)
    _add_missing_columns(engine)
    if fresh and path is not None:
        os.chmod(path, 0o600)
    return engine


def _add_missing_columns(engine: Engine) -> None:
    """Add columns that this version's tables have and an older database lacks (all are nullable or
    have a default), and drop the index that allowed one active key per name (rotation needs two)."""
    with engine.begin() as connection:
        inspector = inspect(connection)
        for table in Base.metadata.sorted_tables:
            present = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                kind = column.type.compile(dialect=engine.dialect)
                default = column.default.arg if column.default is not None else None
                clause = ""
                if isinstance(default, bool):
                    clause = f" DEFAULT {'TRUE' if default else 'FALSE'}"
                elif column.name == "models":
                    clause = " DEFAULT '[\"*\"]'"
                connection.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}{clause}"))
        connection.execute(text("DROP INDEX IF EXISTS uq_api_keys_active_name"))
