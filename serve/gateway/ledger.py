"""The usage ledger: one row per request, written off the hot path by one batched writer per worker.

``record`` only appends a dict to a list (no I/O, never blocks a stream). A background task inserts what
has gathered every ``flush_interval_s`` seconds, or as soon as ``batch_rows`` are waiting, in one
transaction in a thread, with column converters prepared once (SQLAlchemy's per-row parameter
processing cost as much CPU as the rest of the gateway's bookkeeping), in as few statements as the
database allows: ``INSERT ... VALUES (...), (...), ...`` of up to ``MAX_ROWS_PER_STATEMENT`` rows, in
sizes that are powers of two (375 rows: 256 + 64 + 32 + 16 + 4 + 2 + 1), so a connection's statement
cache holds at most nine of them whatever the batch sizes. The thread shares the event loop's
interpreter, and the DBAPI lets go of the GIL around every statement it runs: an ``executemany`` of one
row per statement handed the GIL back and forth with the event loop once per row (measured with
``getrusage``, in process, one request at a time: 8 voluntary context switches per request, 1 without a
ledger; 1.1 with multi-row statements). A failed insert (a locked or
unreachable database) keeps its rows and retries with backoff; at shutdown the writer flushes
everything, and rows it still cannot insert are appended to a JSONL spill file
(``<state>/ledger-spill-<pid>.jsonl``) and logged, never dropped. Each spilled line is one
``usage_ledger`` row, ready to insert by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Boolean, DateTime, Float, Integer, String
from sqlalchemy.engine import Engine

from serve.gateway.store import LedgerRow

logger = logging.getLogger(__name__)


_LEDGER = LedgerRow.__table__
COLUMNS = tuple(column.name for column in _LEDGER.columns if column.name != "id")
"""The ``usage_ledger`` columns a row gives, in order (``record_values``)."""
_DEFAULTS = {
    column.name: column.default.arg
    for column in _LEDGER.columns
    if column.default is not None and not callable(column.default.arg)
}
_PLACEHOLDER = {"qmark": "?", "format": "%s", "pyformat": "%s"}  # positional (sqlite3, psycopg)
MAX_ROWS_PER_STATEMENT = 256
"""Most rows one INSERT carries (a power of two; fewer where the database allows fewer bound
parameters)."""
_POSTGRES_MAX_PARAMETERS = 65535  # the wire protocol's Bind message counts them in 16 bits


@functools.lru_cache(maxsize=4)
def _utc_second(second: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))


def sqlite_datetime(value: datetime | float) -> str:
    """The text SQLAlchemy's SQLite ``DATETIME`` stores for ``value`` (its default storage format,
    ``YYYY-MM-DD HH:MM:SS.ffffff``, the wall time without a zone): one call per ledger row.

    ``value`` is a datetime (its own wall time) or, as the request path records it, epoch seconds (UTC):
    those are formatted from the text of their second, made once per second, and their microseconds,
    rounded to the nearest (``datetime.fromtimestamp`` may round a value half-way between two the
    other way): 0.6 us per row against 1.2 us for ``datetime.now`` and ``isoformat``, timed 2026-12-05."""
    if type(value) is float:
        second, micro = divmod(round(value * 1_000_000), 1_000_000)
        return f"{_utc_second(second)}.{micro:06d}"
    assert isinstance(value, datetime)
    return value.isoformat(" ", "microseconds")[:26]


def utc_datetime(value: datetime | float) -> datetime:
    """``value`` as an aware datetime: epoch seconds (the request path's) in UTC, a datetime as it is."""
    return datetime.fromtimestamp(value, UTC) if isinstance(value, float) else value


# Column types whose values a ledger row already holds as the Python type the DBAPI binds as it is (bool,
# int, float, str, None for sqlite3 and psycopg): SQLAlchemy's processors for them would only copy.
_BOUND_AS_IS = (Boolean, Integer, Float, String)


def insert_statement(engine: Engine) -> tuple[str, str, list[tuple[int, Callable[[Any], Any]]]]:
    """The ``usage_ledger`` INSERT in the engine's DBAPI parameter style (positional, ``COLUMNS``
    order) as its head (``INSERT INTO ... VALUES``) and one row's placeholders (``(?, ..., ?)``), and
    the columns whose values must be converted first (on SQLite: ``created_at`` to its text and
    ``stream`` to 0 / 1; elsewhere: ``created_at`` given as epoch seconds to a datetime)."""
    dialect = engine.dialect
    quote = dialect.identifier_preparer.quote
    mark = _PLACEHOLDER[dialect.paramstyle]
    head = f"INSERT INTO {quote(_LEDGER.name)} ({', '.join(quote(name) for name in COLUMNS)}) VALUES "
    row = f"({', '.join(mark for _ in COLUMNS)})"
    converters: list[tuple[int, Callable[[Any], Any]]] = []
    for index, name in enumerate(COLUMNS):
        column_type = _LEDGER.c[name].type
        if dialect.name == "sqlite" and isinstance(column_type, DateTime | Boolean):
            # sqlite3 binds exact ints, floats and strings directly; anything else, a bool included,
            # goes through its adapter lookup first (CPython Modules/_sqlite/cursor.c, need_adapt),
            # so a bool is given as 0 / 1, which is what SQLAlchemy stores for it.
            converters.append((index, sqlite_datetime if isinstance(column_type, DateTime) else int))
            continue
        if isinstance(column_type, DateTime):
            converters.append((index, utc_datetime))  # the DBAPI binds a datetime, not epoch seconds
            continue
        if isinstance(column_type, _BOUND_AS_IS):
            continue
        converter = column_type.dialect_impl(dialect).bind_processor(dialect)
        if converter is not None:
            converters.append((index, converter))
    return head, row, converters


def rows_per_statement(driver_connection: Any) -> int:
    """How many ledger rows one INSERT may carry on this DBAPI connection: ``MAX_ROWS_PER_STATEMENT``,
    or the largest power of two under it whose parameters fit the database's limit on bound parameters
    per statement (SQLite's ``SQLITE_LIMIT_VARIABLE_NUMBER``: 999 before SQLite 3.32.0, 32,766 after,
    or as compiled; Postgres: 65,535)."""
    if isinstance(driver_connection, sqlite3.Connection):
        limit = driver_connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    else:
        limit = _POSTGRES_MAX_PARAMETERS
    fits = max(1, min(MAX_ROWS_PER_STATEMENT, limit // len(COLUMNS)))
    return 1 << (fits.bit_length() - 1)


def chunk_sizes(count: int, largest: int) -> Iterator[int]:
    """``count`` rows as statement sizes: ``largest`` (a power of two) while it fits, then the powers of
    two of what is left, largest first (``chunk_sizes(375, 256)``: 256, 64, 32, 16, 4, 2, 1)."""
    while count >= largest:
        yield largest
        count -= largest
    size = largest
    while count:
        size >>= 1
        if count & size:
            yield size
            count -= size


class LedgerWriter:
    """Batches ledger rows into the database.

    Args:
        engine: the gateway's database.
        spill_dir: where rows go that could not be inserted by shutdown.
        flush_interval_s: longest a row waits in memory.
        batch_rows: rows that trigger a flush before the interval.
    """

    def __init__(
        self, engine: Engine, spill_dir: Path, flush_interval_s: float = 0.25, batch_rows: int = 500
    ) -> None:
        self.engine = engine
        self.spill_dir = spill_dir
        self.flush_interval_s = flush_interval_s
        self.batch_rows = batch_rows
        self._rows: list[tuple[Any, ...]] = []  # values in COLUMNS order
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.written = 0
        self._head, self._row_marks, self._converters = insert_statement(engine)
        self._per_statement: int | None = None  # rows per INSERT: known once a connection is open
        self._statements: dict[int, str] = {}  # the INSERT of n rows (n a power of two), by n

    def record(self, row: dict[str, Any]) -> None:
        """Queue one row (the columns of ``LedgerRow``, without ``id``; missing ones take their default)."""
        self.record_values(tuple(row.get(name, _DEFAULTS.get(name)) for name in COLUMNS))

    def record_values(self, values: tuple[Any, ...]) -> None:
        """Queue one row given as its values in ``COLUMNS`` order (the request path: no dict to build)."""
        self._rows.append(values)
        if len(self._rows) >= self.batch_rows:
            self._wake.set()

    def start(self) -> None:
        """Start the background task (in the running event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ledger-writer")

    def _statement(self, count: int) -> str:
        """The INSERT of ``count`` rows (built once per count)."""
        sql = self._statements.get(count)
        if sql is None:
            sql = self._statements[count] = self._head + ", ".join(itertools.repeat(self._row_marks, count))
        return sql

    def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        """Insert ``rows`` in one transaction, as few multi-row statements as the database allows."""
        width = len(COLUMNS)
        values = list(itertools.chain.from_iterable(rows))  # the statements' parameters, row after row
        for index, convert in self._converters:
            for at in range(index, len(values), width):
                if values[at] is not None:
                    values[at] = convert(values[at])
        with self.engine.begin() as connection:
            if self._per_statement is None:
                self._per_statement = rows_per_statement(connection.connection.driver_connection)
            start = 0
            for size in chunk_sizes(len(rows), self._per_statement):
                end = start + size * width
                connection.exec_driver_sql(self._statement(size), tuple(values[start:end]))
                start = end

    async def _flush(self) -> bool:
        """Insert what is queued; False (rows kept, in order) if the database refused."""
        if not self._rows:
            return True
        rows, self._rows = self._rows, []
        try:
            await asyncio.to_thread(self._insert, rows)
        except Exception as exc:
            self._rows = rows + self._rows
            logger.warning("ledger insert of %d rows failed (kept, will retry): %r", len(rows), exc)
            return False
        self.written += len(rows)
        return True

    async def _run(self) -> None:
        backoff = self.flush_interval_s
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=backoff)
            self._wake.clear()
            ok = await self._flush()
            backoff = self.flush_interval_s if ok else min(backoff * 2, 5.0)

    async def close(self, attempts: int = 3) -> None:
        """Stop the task and flush everything; spill what the database still refuses."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        for attempt in range(attempts):
            if await self._flush():
                return
            await asyncio.sleep(0.2 * (attempt + 1))
        self._spill()

    def _spill(self) -> None:
        if not self._rows:
            return
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"ledger-spill-{os.getpid()}.jsonl"
        with path.open("a") as out:
            for row in self._rows:
                values = dict(zip(COLUMNS, row, strict=True))
                values["created_at"] = utc_datetime(values["created_at"])
                out.write(json.dumps(values, default=_json_default) + "\n")
            out.flush()
            os.fsync(out.fileno())
        logger.error(
            "could not write %d ledger rows to the database; appended them to %s", len(self._rows), path
        )
        self._rows = []


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
