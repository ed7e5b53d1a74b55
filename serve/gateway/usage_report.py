"""Usage per key, model and UTC day, read from the ledger: ``GET /v1/usage`` and ``kit usage``.

Rows reach the ledger in batches (``ledger_flush_interval_s``), so the last fraction of a second may be
missing from a report.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.engine import Engine

from serve.gateway.store import LedgerRow, reader

COLUMNS = ("requests", "refused", "prompt_tokens", "completion_tokens", "reasoning_tokens", "cached_tokens")


def usage_rows(
    engine: Engine, *, key: str | None, days: int, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Totals per (day, key, model) for the last ``days`` UTC days, oldest first (blocking).

    Args:
        engine: the gateway's database.
        key: only this key name; None for every key.
        days: how many days back, today included (>= 1).

    Returns:
        Dicts with ``date`` (YYYY-MM-DD), ``key``, ``model`` and the ``COLUMNS``: ``requests`` served
        (answered, failed or left), ``refused`` by the gateway (policy, limits, size), tokens (reasoning
        tokens are part of completion tokens, shown apart because thinking is what they cost). A row
        with no model is ``GET /v1/models`` calls.
    """
    now = now or datetime.now(UTC)
    since = datetime(now.year, now.month, now.day, tzinfo=UTC) - timedelta(days=days - 1)
    day = func.date(LedgerRow.created_at).label("day")
    query = (
        select(
            day,
            LedgerRow.key_name,
            LedgerRow.model,
            func.count().label("all"),
            func.sum(case((LedgerRow.outcome == "rejected", 1), else_=0)),
            func.sum(LedgerRow.prompt_tokens),
            func.sum(LedgerRow.completion_tokens),
            func.sum(LedgerRow.reasoning_tokens),
            func.sum(LedgerRow.cached_tokens),
        )
        .where(LedgerRow.created_at >= since, LedgerRow.key_name.is_not(None))
        .group_by(day, LedgerRow.key_name, LedgerRow.model)
        .order_by(day, LedgerRow.key_name, LedgerRow.model)
    )
    if key is not None:
        query = query.where(LedgerRow.key_name == key)
    with reader(engine).connect() as connection:
        rows = connection.execute(query).all()
    out = []
    for r in rows:
        every, refused, *tokens = (int(v or 0) for v in r[3:])
        values = (every - refused, refused, *tokens)
        out.append({"date": str(r[0]), "key": r[1], "model": r[2], **dict(zip(COLUMNS, values, strict=True))})
    return out


def totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    """The ``COLUMNS`` summed over ``rows``."""
    return {c: sum(r[c] for r in rows) for c in COLUMNS}


def render_table(rows: list[dict[str, Any]]) -> str:
    """``rows`` as an aligned text table with a total line (what ``make usage`` prints)."""
    header = ("date", "key", "model", "requests", "refused", "prompt", "completion", "reasoning", "cached")
    lines = [header]
    for r in rows:
        lines.append((r["date"], r["key"], str(r["model"]), *(str(r[c]) for c in COLUMNS)))
    total = totals(rows)
    lines.append(("total", "", "", *(str(total[c]) for c in COLUMNS)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for line in lines:
        cells = [cell.ljust(widths[i]) if i < 3 else cell.rjust(widths[i]) for i, cell in enumerate(line)]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def usage_in_windows(engine: Engine, now: float) -> dict[str, tuple[int, int, int, int]]:
    """Per key name, what the ledger counts in the current windows: ``(day tokens, month tokens, minute
    tokens, minute requests)`` (UTC; tokens = prompt + completion). Seeds the in-memory limit counters
    when the gateway starts, so budgets survive a restart (blocking)."""
    at = datetime.fromtimestamp(now, UTC)
    starts = {
        "month": datetime(at.year, at.month, 1, tzinfo=UTC),
        "day": datetime(at.year, at.month, at.day, tzinfo=UTC),
        "minute": at.replace(second=0, microsecond=0),
    }
    tokens = func.sum(LedgerRow.prompt_tokens + LedgerRow.completion_tokens)
    found: dict[str, dict[str, tuple[int, int]]] = {}
    with reader(engine).connect() as connection:
        for window, start in starts.items():
            query = (
                select(LedgerRow.key_name, tokens, func.count())
                .where(
                    LedgerRow.created_at >= start,
                    LedgerRow.key_name.is_not(None),
                    LedgerRow.outcome != "rejected",  # refused requests counted nothing
                )
                .group_by(LedgerRow.key_name)
            )
            for name, total, requests in connection.execute(query):
                found.setdefault(name, {})[window] = (int(total or 0), int(requests))
    return {
        name: (
            w.get("day", (0, 0))[0],
            w.get("month", (0, 0))[0],
            w.get("minute", (0, 0))[0],
            w.get("minute", (0, 0))[1],
        )
        for name, w in found.items()
    }
