"""Reconcile `make soak-ledger`'s load with the usage ledger: one row per sent request, with the status and
outcome the client's view implies.

What the client saw maps to the ledger row it must have (``acceptable``):

- a whole answer -> ``ok`` with the same status; on a 200, the tokens the client saw in ``usage`` (or,
  for a stream whose client did not ask for usage, more than zero prompt and completion tokens, and no
  usage-only chunk reaching the client);
- left early -> ``client_disconnect`` / 499;
- a stream that broke after its 200 -> ``upstream_error`` / 200;
- 503 or 504 -> ``upstream_error`` with that status; 401/403/405/413/429 -> ``rejected``.

One race is inherent when the upstream dies under a request whose client is leaving at the same time:
the gateway notices whichever comes first, the broken upstream or the gone client (it may still hold a
request for a few ms after its client left). So a client that left early may instead have
``upstream_error`` (200 for a stream, 503 otherwise), but only when the row's own time span (its
``created_at`` + ``latency_ms``) overlaps the outage, from the kill until the upstream answered again.
These are accepted and counted apart (``race_accepted``), never silently. A client
whose connection to the gateway failed (``transport_error``) must still have exactly one row, either
``client_disconnect`` or ``upstream_error``; these are counted apart too. A non-streamed client that
left before the gateway read its body (uvicorn reports the disconnect before a body it has buffered)
gets a ``client_disconnect`` row without a model and with ``stream`` false; accepted for such clients
only, and counted (``body_unread``).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from soak_ledger_load import PATH, Seen
from sqlalchemy import select

from serve.gateway.store import LedgerRow, open_engine

GATEWAY_REJECTS = frozenset({400, 401, 403, 405, 413, 429})
CLOCK_SLACK = timedelta(milliseconds=50)  # row times come from the gateway's clock, the window from ours


@dataclass(frozen=True)
class Row:
    """The ledger columns the reconcile checks, and where the row was found (``db`` or ``spill``)."""

    request_id: str
    status: int
    outcome: str
    stream: bool
    key_name: str | None
    model: str | None
    route: str
    prompt_tokens: int
    completion_tokens: int
    created_at: datetime | None = None
    latency_ms: float = 0.0
    source: str = "db"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat() if self.created_at else None
        return data

    def overlaps(self, window: tuple[datetime, datetime] | None) -> bool:
        """Whether the gateway held this request at some moment of ``window`` (start, end; UTC)."""
        if window is None or self.created_at is None:
            return False
        end = self.created_at + timedelta(milliseconds=self.latency_ms)
        return self.created_at <= window[1] + CLOCK_SLACK and end >= window[0] - CLOCK_SLACK


def _utc(value: datetime | str) -> datetime:
    """An aware UTC datetime (SQLite returns naive ones, spill files hold ISO strings)."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def read_rows(database_url: str, spill_dir: Path) -> list[Row]:
    """Every ``usage_ledger`` row in the database, plus those in ``ledger-spill-*.jsonl`` files."""
    engine = open_engine(database_url, create=False)
    columns = [getattr(LedgerRow, name) for name in Row.__dataclass_fields__ if name != "source"]
    with engine.connect() as connection:
        rows = [Row(*values) for values in connection.execute(select(*columns))]
    engine.dispose()
    for path in sorted(spill_dir.glob("ledger-spill-*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                data = json.loads(line)
                fields = {name: data[name] for name in Row.__dataclass_fields__ if name != "source"}
                rows.append(Row(**fields, source="spill"))
    return [replace(row, created_at=_utc(row.created_at)) if row.created_at else row for row in rows]


def acceptable(seen: Seen, racy: bool = False) -> list[tuple[str, int | None]]:
    """The ``(outcome, status)`` pairs the ledger may show for ``seen``, the expected one first; a
    status of None accepts any status. ``racy``: the gateway held the request during the outage."""
    stream = seen.spec.stream
    if seen.result == "complete":
        return [("ok", seen.status)]
    if seen.result == "left_early":
        expected: list[tuple[str, int | None]] = [("client_disconnect", 499)]
        if racy:
            expected.append(("upstream_error", 200 if stream else 503))
        return expected
    if seen.result == "stream_broken":
        return [("upstream_error", 200)]
    if seen.result == "error_status":
        status = seen.status
        if status in (503, 504):
            return [("upstream_error", status)]
        if status in GATEWAY_REJECTS:
            return [("rejected", status), ("ok", status)] if status == 400 else [("rejected", status)]
        return [("ok", status)]
    return [("client_disconnect", 499), ("upstream_error", None)]  # transport_error


@dataclass
class Mismatch:
    request_id: str
    problem: str
    seen: dict[str, Any]
    row: dict[str, Any]


@dataclass
class Report:
    """The reconcile's verdict.

    Attributes:
        lost: sent request ids with no row.
        duplicated: sent request ids with more than one row.
        unknown: rows whose request id was never sent.
        mismatches: rows whose status, outcome, tokens or columns contradict what the client saw (and
            clients that saw a usage-only chunk they did not ask for).
        race_accepted: rows that matched one of the inherent races (see the module docstring).
        body_unread: rows of non-streamed clients that left before the gateway read their body (no model
            in the row: uvicorn reports the disconnect before the buffered body).
        table: per kind of client view: requests, the ledger's outcome/status counts, mismatches.
    """

    sent: int
    rows_db: int
    rows_spilled: int
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    race_accepted: int = 0
    body_unread: int = 0
    transport_errors: int = 0
    table: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.unknown or self.mismatches)

    def to_json(self, limit: int = 200) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "rows": self.rows_db + self.rows_spilled,
            "rows_db": self.rows_db,
            "rows_spilled": self.rows_spilled,
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "unknown": len(self.unknown),
            "mismatches": len(self.mismatches),
            "race_accepted": self.race_accepted,
            "body_unread": self.body_unread,
            "transport_errors": self.transport_errors,
            "ok": self.ok,
            "table": self.table,
            "lost_ids": self.lost[:limit],
            "duplicated_ids": self.duplicated[:limit],
            "unknown_ids": self.unknown[:limit],
            "mismatch_details": [asdict(m) for m in self.mismatches[:limit]],
        }


def _check_row(
    seen: Seen, row: Row, key_name: str, model: str, outage: tuple[datetime, datetime] | None
) -> tuple[str | None, str | None]:
    """What is wrong with ``row`` for ``seen`` (None: nothing), and which allowance it needed, if any
    (``race``, or ``body_unread``: a non-streamed client that left before the gateway read its body, so
    the row cannot know the model)."""
    spec = seen.spec
    allowance = None
    columns: tuple[tuple[str, object], ...] = (
        ("stream", spec.stream),
        ("key_name", key_name),
        ("model", model),
        ("route", PATH),
    )
    left = seen.result == "left_early" and not spec.stream
    if left and row.outcome == "client_disconnect" and row.model is None and not row.stream:
        allowance, columns = "body_unread", (("key_name", key_name), ("route", PATH))
    for column, want in columns:
        if getattr(row, column) != want:
            return f"{column} is {getattr(row, column)!r}, not {want!r}", None
    options = acceptable(seen, row.overlaps(outage))
    position = next(
        (i for i, (o, s) in enumerate(options) if o == row.outcome and s in (None, row.status)), None
    )
    if position is None:
        wanted = " or ".join(f"{o}/{s if s is not None else '*'}" for o, s in options)
        return f"ledger says {row.outcome}/{row.status}, the client's view implies {wanted}", None
    if row.outcome == "ok" and row.status == 200:
        if seen.usage is not None and seen.usage != (row.prompt_tokens, row.completion_tokens):
            return (
                f"ledger tokens {row.prompt_tokens}+{row.completion_tokens}, the client saw "
                f"{seen.usage[0]}+{seen.usage[1]}"
            ), None
        if seen.usage is None and not (row.prompt_tokens > 0 and row.completion_tokens > 0):
            return f"ledger tokens {row.prompt_tokens}+{row.completion_tokens} for an answered request", None
    return None, "race" if position > 0 else allowance


def _client_problem(seen: Seen) -> str | None:
    """A fault visible to the client alone (the gateway's usage handling)."""
    if seen.result != "complete" or seen.status != 200:
        return None
    if seen.spec.kind == "stream" and seen.usage_only_chunk:
        return "a usage-only chunk reached a client that did not ask for usage"
    if seen.spec.kind in ("stream_usage", "json") and seen.usage is None:
        return "the client asked for usage (or got a whole answer) but saw none"
    return None


def _label(seen: Seen) -> str:
    if seen.result == "error_status":
        return f"status {seen.status}"
    if seen.result == "complete":
        return f"complete {seen.status} ({'stream' if seen.spec.stream else 'json'})"
    if seen.result == "left_early":
        return f"left early ({'stream' if seen.spec.stream else 'json'})"
    return seen.result.replace("_", " ")


def reconcile(
    seen: list[Seen],
    rows: list[Row],
    key_name: str,
    model: str,
    outage: tuple[datetime, datetime] | None = None,
) -> Report:
    """Check ``rows`` against ``seen``: exactly one row per sent request, none unknown, each consistent.

    Args:
        seen: what the load generator saw, one per sent request.
        rows: the ledger (``read_rows``).
        key_name / model: what every row must name.
        outage: from the kill until the upstream answered again (UTC), for the race (module docstring).
    """
    by_id: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_id[row.request_id].append(row)
    sent_ids = {s.spec.request_id for s in seen}
    report = Report(
        sent=len(seen),
        rows_db=sum(r.source == "db" for r in rows),
        rows_spilled=sum(r.source == "spill" for r in rows),
        unknown=sorted(i for i in by_id if i not in sent_ids),
    )
    groups: dict[str, dict[str, Any]] = {}
    for one in seen:
        found = by_id.get(one.spec.request_id, [])
        label = _label(one)
        group = groups.setdefault(
            label, {"client saw": label, "requests": 0, "ledger": Counter(), "wrong": 0}
        )
        group["requests"] += 1
        report.transport_errors += one.result == "transport_error"
        for row in found:
            group["ledger"][f"{row.outcome} {row.status}"] += 1
        problem: str | None = None
        if not found:
            report.lost.append(one.spec.request_id)
            problem = "no ledger row"
        elif len(found) > 1:
            report.duplicated.append(one.spec.request_id)
            problem = f"{len(found)} ledger rows"
        else:
            problem, allowance = _check_row(one, found[0], key_name, model, outage)
            if problem is None:
                report.race_accepted += allowance == "race"
                report.body_unread += allowance == "body_unread"
            problem = problem or _client_problem(one)
            if problem is not None:
                report.mismatches.append(
                    Mismatch(one.spec.request_id, problem, one.to_json(), found[0].to_json())
                )
        if problem is not None:
            group["wrong"] += 1
    for group in sorted(groups.values(), key=lambda g: -g["requests"]):
        group["ledger"] = dict(group["ledger"].most_common())
        report.table.append(group)
    return report


def format_table(report: Report) -> str:
    """The per-view table as aligned text."""
    lines = [f"{'client saw':<26} {'requests':>8}  {'ledger (outcome status: rows)':<52} {'wrong':>5}"]
    for group in report.table:
        ledger = ", ".join(f"{k}: {v}" for k, v in group["ledger"].items()) or "-"
        lines.append(f"{group['client saw']:<26} {group['requests']:>8}  {ledger:<52} {group['wrong']:>5}")
    return "\n".join(lines)
