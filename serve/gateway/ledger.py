"""The usage ledger: one row per request, written off the hot path by one batched writer per worker.

``record`` only appends a dict to a list (no I/O, never blocks a stream). A background task inserts what
has gathered every ``flush_interval_s`` seconds, or as soon as ``batch_rows`` are waiting, in one
transaction in a thread, as one DBAPI ``executemany`` of a statement and column converters prepared
once (SQLAlchemy's per-row parameter processing cost as much CPU as the rest of the gateway's
bookkeeping, and the thread shares the event loop's interpreter). A failed insert (a locked or
unreachable database) keeps its rows and retries with backoff; at shutdown the writer flushes
everything, and rows it still cannot insert are appended to a JSONL spill file
(``<state>/ledger-spill-<pid>.jsonl``) and logged, never dropped. Each spilled line is one
``usage_ledger`` row, ready to insert by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from datetime import datetime
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


def sqlite_datetime(value: datetime) -> str:
    """The text SQLAlchemy's SQLite ``DATETIME`` stores for ``value`` (its default storage format,
    ``YYYY-MM-DD HH:MM:SS.ffffff``, the wall time without a zone), made by ``datetime.isoformat`` in C
    instead of a ``%`` over seven fields in Python: one call per ledger row."""
    return value.isoformat(" ", "microseconds")[:26]


# Column types whose values a ledger row already holds as the Python type the DBAPI binds as it is (bool,
# int, float, str, None for sqlite3 and psycopg): SQLAlchemy's processors for them would only copy.
_BOUND_AS_IS = (Boolean, Integer, Float, String)


def insert_statement(engine: Engine) -> tuple[str, list[tuple[int, Callable[[Any], Any]]]]:
    """The ``usage_ledger`` INSERT in the engine's DBAPI parameter style (positional, ``COLUMNS``
    order), and the columns whose values must be converted first (on SQLite: ``created_at`` to its text
    and ``stream`` to 0 / 1; on Postgres: none)."""
    dialect = engine.dialect
    quote = dialect.identifier_preparer.quote
    style = _PLACEHOLDER[dialect.paramstyle]
    marks = ", ".join(
        style.format(index + 1 if dialect.paramstyle == "numeric" else name)
        for index, name in enumerate(COLUMNS)
    )
    sql = f"INSERT INTO {quote(_LEDGER.name)} ({', '.join(quote(name) for name in COLUMNS)}) VALUES ({marks})"
    converters: list[tuple[int, Callable[[Any], Any]]] = []
    for index, name in enumerate(COLUMNS):
        column_type = _LEDGER.c[name].type
        if dialect.name == "sqlite" and isinstance(column_type, DateTime | Boolean):
            # sqlite3 binds exact ints, floats and strings directly; anything else, a bool included,
            # goes through its adapter lookup first (CPython Modules/_sqlite/cursor.c, need_adapt),
            # so a bool is given as 0 / 1, which is what SQLAlchemy stores for it.
            converters.append((index, sqlite_datetime if isinstance(column_type, DateTime) else int))
            continue
        if isinstance(column_type, _BOUND_AS_IS):
            continue
        converter = column_type.dialect_impl(dialect).bind_processor(dialect)
        if converter is not None:
            converters.append((index, converter))
    return sql, converters


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
        self._sql, self._converters = insert_statement(engine)

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

    def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        converters = self._converters
        params: list[Any] = rows
        if converters:
            params = []
            for row in rows:
                values = list(row)
                for index, convert in converters:
                    if values[index] is not None:
                        values[index] = convert(values[index])
                params.append(tuple(values))
        with self.engine.begin() as connection:
            connection.exec_driver_sql(self._sql, params)

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
                out.write(json.dumps(dict(zip(COLUMNS, row, strict=True)), default=_json_default) + "\n")
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
