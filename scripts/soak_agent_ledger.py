"""`make soak-agent`'s ledger check: every request the agent made has exactly one ``usage_ledger`` row
under the soak's key, saying what the SDK saw.

Rows are read with ``soak_ledger_reconcile.read_rows`` (the database and any ``ledger-spill-*.jsonl``).
For each request the agent sent (``x-request-id`` of its own): one row, no more; the key's name; the
route; ``stream`` as sent; ``ok`` / 200 when the SDK got an answer; and for a chat completion the served
model and the prompt and completion tokens of the ``usage`` the SDK got (the streamed ones from the
usage chunk). Rows under the key that the agent never sent are ``unknown``. A row found only in a spill
file (the gateway could not insert it by shutdown) is ``spilled``: it is not in ``usage_ledger``, and for
this soak (one request at a time, a local SQLite file) that is a failure, not a fallback.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from soak_agent_loop import Sent
from soak_ledger_reconcile import Row


@dataclass
class LedgerCheck:
    """The ledger against the agent's requests."""

    requests: int = 0
    rows: int = 0
    """Rows under the key (database and spill files)."""
    rows_spilled: int = 0
    spilled: list[str] = field(default_factory=list)
    """Request ids whose row is only in a spill file, not in ``usage_ledger``."""
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    mismatches: list[tuple[str, str]] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.unknown or self.mismatches or self.spilled)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "requests": self.requests,
            "rows": self.rows,
            "rows_in_usage_ledger": self.rows - self.rows_spilled,
            "rows_spilled": self.rows_spilled,
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "unknown": len(self.unknown),
            "mismatches": len(self.mismatches),
            "outcomes": dict(self.outcomes.most_common()),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "details": {
                "spilled": self.spilled[:20],
                "lost": self.lost[:20],
                "duplicated": self.duplicated[:20],
                "unknown": self.unknown[:20],
                "mismatches": [{"request_id": r, "problem": p} for r, p in self.mismatches[:20]],
            },
        }


def row_problem(sent: Sent, row: Row, key_name: str, model: str) -> str | None:
    """What ``row`` gets wrong about ``sent``, or None."""
    if row.key_name != key_name:
        return f"key_name is {row.key_name!r}, not {key_name!r}"
    if row.route != sent.route:
        return f"route is {row.route!r}, not {sent.route!r}"
    if bool(row.stream) != sent.stream:
        return f"stream is {bool(row.stream)}, not {sent.stream}"
    if sent.ok and (row.outcome, row.status) != ("ok", 200):
        return f"ledger says {row.outcome}/{row.status} for a request the SDK got an answer to"
    if not sent.ok and row.outcome == "ok" and row.status == 200:
        return "ledger says ok/200 for a request that failed in the SDK"
    if sent.route == "/v1/chat/completions" and sent.ok:
        if row.model != model:
            return f"model is {row.model!r}, not {model!r}"
        if sent.usage is not None and (row.prompt_tokens, row.completion_tokens) != sent.usage:
            return (
                f"ledger tokens {row.prompt_tokens}+{row.completion_tokens}, "
                f"the SDK saw {sent.usage[0]}+{sent.usage[1]}"
            )
    return None


def check_ledger(sent: list[Sent], rows: list[Row], key_name: str, model: str) -> LedgerCheck:
    """Reconcile the agent's requests with the rows (all rows: those of other keys are ignored)."""
    mine = [row for row in rows if row.key_name == key_name]
    check = LedgerCheck(requests=len(sent), rows=len(mine))
    check.spilled = sorted({row.request_id for row in mine if row.source == "spill"})
    check.rows_spilled = sum(row.source == "spill" for row in mine)
    by_id: dict[str, list[Row]] = {}
    for row in mine:
        by_id.setdefault(row.request_id, []).append(row)
        check.outcomes[f"{row.outcome} {row.status}"] += 1
        check.prompt_tokens += row.prompt_tokens
        check.completion_tokens += row.completion_tokens
    sent_ids = {one.request_id for one in sent}
    check.unknown = sorted(set(by_id) - sent_ids)
    for one in sent:
        found = by_id.get(one.request_id, [])
        if not found:
            check.lost.append(one.request_id)
        elif len(found) > 1:
            check.duplicated.append(one.request_id)
        elif (problem := row_problem(one, found[0], key_name, model)) is not None:
            check.mismatches.append((one.request_id, problem))
    return check
