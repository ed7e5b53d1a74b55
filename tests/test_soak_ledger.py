"""The usage ledger's soak proof (scripts/soak_ledger.py): a short run of the same code path as
`make soak-ledger`, and the reconcile's checks each shown to catch the fault it names."""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import func, insert, select

from serve.gateway.store import LedgerRow, open_engine

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "soak_ledger.py"


@pytest.fixture
def soak(monkeypatch: pytest.MonkeyPatch) -> tuple[ModuleType, ModuleType]:
    """The load and reconcile modules (they sit beside the script, as it imports them)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    return importlib.import_module("soak_ledger_load"), importlib.import_module("soak_ledger_reconcile")


def test_short_soak_through_the_real_gateway_leaves_exactly_one_right_row_per_request(tmp_path: Path):
    work, out = tmp_path / "work", tmp_path / "soak.json"
    args = ["--upstream", "fake", "--requests", "300", "--workdir", str(work), "--json", str(out)]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "fake upstream" in done.stdout and "RESULT:    OK" in done.stdout
    record = json.loads(out.read_text())
    result = record["reconcile"]
    assert (result["sent"], result["rows"]) == (300, 300)
    assert result["lost"] == result["duplicated"] == result["unknown"] == result["mismatches"] == 0
    assert record["gateway"] == {
        "workers": 2,
        "exit_code": 0,
        "log": {"tracebacks": 0, "ledger_warnings": 0, "ledger_spilled": 0},
    }
    # The upstream really died in the middle: all 9 requests sent while it was down got the gateway's
    # 503, and requests before and after were answered.
    load = record["load"]
    assert (load["kill_at"], load["outage_requests"]) == (150, 9)
    assert load["streams_mid_way_at_kill"] >= 1 and load["in_flight_at_kill"] >= 1
    assert sum(load["phases"]["at_kill"].values()) == load["in_flight_at_kill"]
    assert load["phases"]["outage"] == {"error_status 503": 9}
    assert load["phases"]["before"]["complete 200"] > 100
    assert load["phases"]["after"]["complete 200"] > 100
    ledger = {row["client saw"]: row["ledger"] for row in result["table"]}
    assert set(ledger["status 503"]) == {"upstream_error 503"}
    assert ledger["left early (stream)"].get("client_disconnect 499", 0) >= 1
    # Request 182 (after the restart; 41 and 78 may still be waiting when the kill comes).
    assert ledger["left early (json)"].get("client_disconnect 499", 0) >= 1
    # The ledger itself, read here without the script's reconcile: one row per sent id.
    engine = open_engine(f"sqlite:///{work / 'gw.sqlite'}", create=False)
    with engine.connect() as connection:
        rows = connection.execute(select(func.count(), func.count(LedgerRow.request_id.distinct()))).one()
    engine.dispose()
    assert tuple(rows) == (300 - result["rows_spilled"], 300 - result["rows_spilled"])


def _seen(load: ModuleType, index: int, kind: str, **fields: Any) -> Any:
    spec = load.Spec(index, f"soak-t-{index:06d}", kind, 512 if kind.startswith("leave") else 3)
    return load.Seen(spec, **fields)


def _row(
    reconcile: ModuleType, seen: Any, outcome: str, status: int, tokens: tuple[int, int] = (0, 0)
) -> Any:
    return reconcile.Row(
        seen.spec.request_id,
        status,
        outcome,
        seen.spec.stream,
        "soak",
        "m",
        "/v1/chat/completions",
        *tokens,
    )


def _consistent(load: ModuleType, reconcile: ModuleType) -> tuple[list[Any], list[Any]]:
    """A small load where every row matches what its client saw: one of each kind of view."""
    seen = [
        _seen(load, 0, "json", result="complete", status=200, usage=(9, 3)),
        _seen(load, 1, "stream", result="complete", status=200),
        _seen(load, 2, "stream_usage", result="complete", status=200, usage=(9, 2)),
        _seen(load, 3, "leave_stream", result="left_early", status=200),
        _seen(load, 4, "leave_json", result="left_early"),
        _seen(load, 5, "long_stream", result="stream_broken", status=200, phase="at_kill"),
        _seen(load, 6, "json", result="error_status", status=503, phase="outage"),
    ]
    rows = [
        _row(reconcile, seen[0], "ok", 200, (9, 3)),
        _row(reconcile, seen[1], "ok", 200, (9, 4)),
        _row(reconcile, seen[2], "ok", 200, (9, 2)),
        _row(reconcile, seen[3], "client_disconnect", 499),
        _row(reconcile, seen[4], "client_disconnect", 499),
        _row(reconcile, seen[5], "upstream_error", 200),
        _row(reconcile, seen[6], "upstream_error", 503),
    ]
    return seen, rows


def test_reconcile_accepts_a_ledger_that_matches_every_client_view(soak):
    load, reconcile = soak
    seen, rows = _consistent(load, reconcile)
    report = reconcile.reconcile(seen, rows, "soak", "m")
    assert report.ok, report.to_json()
    assert (report.sent, report.rows_db, report.race_accepted) == (7, 7, 0)
    assert {g["client saw"]: g["ledger"] for g in report.table}["left early (stream)"] == {
        "client_disconnect 499": 1
    }


@pytest.mark.parametrize(
    ("fault", "field", "expected"),
    [
        ("drop", "lost", ["soak-t-000003"]),
        ("duplicate", "duplicated", ["soak-t-000003"]),
        ("foreign", "unknown", ["soak-x-000001"]),
    ],
)
def test_reconcile_catches_lost_duplicated_and_foreign_rows(soak, fault, field, expected):
    load, reconcile = soak
    seen, rows = _consistent(load, reconcile)
    if fault == "drop":
        del rows[3]
    elif fault == "duplicate":
        rows.append(rows[3])
    else:
        rows.append(
            reconcile.Row("soak-x-000001", 200, "ok", False, "soak", "m", "/v1/chat/completions", 1, 1)
        )
    report = reconcile.reconcile(seen, rows, "soak", "m")
    assert getattr(report, field) == expected
    assert not report.ok
    assert report.to_json()[field] == 1


@pytest.mark.parametrize(
    ("index", "outcome", "status", "tokens", "problem"),
    [
        (3, "ok", 200, (9, 1), "ledger says ok/200, the client's view implies client_disconnect/499"),
        (6, "ok", 503, (0, 0), "ledger says ok/503, the client's view implies upstream_error/503"),
        (5, "ok", 200, (9, 4), "implies upstream_error/200"),
        (0, "ok", 200, (9, 2), "ledger tokens 9+2, the client saw 9+3"),
        (1, "ok", 200, (0, 0), "ledger tokens 0+0 for an answered request"),
        (4, "client_disconnect", 200, (0, 0), "ledger says client_disconnect/200"),
    ],
)
def test_reconcile_catches_a_row_that_contradicts_the_client(soak, index, outcome, status, tokens, problem):
    load, reconcile = soak
    seen, rows = _consistent(load, reconcile)
    rows[index] = _row(reconcile, seen[index], outcome, status, tokens)
    report = reconcile.reconcile(seen, rows, "soak", "m")
    assert [m.request_id for m in report.mismatches] == [seen[index].spec.request_id]
    assert problem in report.mismatches[0].problem
    assert not report.ok
    assert next(g for g in report.table if g["wrong"])["wrong"] == 1


def test_reconcile_checks_key_model_and_stream_columns(soak):
    load, reconcile = soak
    seen, rows = _consistent(load, reconcile)
    rows[0] = dataclasses.replace(rows[0], key_name="someone")
    rows[1] = dataclasses.replace(rows[1], stream=False)
    report = reconcile.reconcile(seen, rows, "soak", "m")
    assert [m.problem for m in report.mismatches] == [
        "key_name is 'someone', not 'soak'",
        "stream is False, not True",
    ]


def test_reconcile_catches_a_usage_chunk_the_client_did_not_ask_for(soak):
    load, reconcile = soak
    seen, rows = _consistent(load, reconcile)
    seen[1].usage_only_chunk = True  # kind "stream": the gateway must strip the chunk it asked for
    seen[2].usage = None  # kind "stream_usage": the client asked, so it must get it
    rows[2] = _row(reconcile, seen[2], "ok", 200, (9, 2))
    report = reconcile.reconcile(seen, rows, "soak", "m")
    assert [m.problem for m in report.mismatches] == [
        "a usage-only chunk reached a client that did not ask for usage",
        "the client asked for usage (or got a whole answer) but saw none",
    ]


def test_the_kill_time_race_is_accepted_only_for_rows_the_gateway_held_during_the_outage(soak):
    load, reconcile = soak
    kill = datetime(2026, 1, 1, 12, tzinfo=UTC)
    window = (kill, kill + timedelta(seconds=40))
    racing = _seen(load, 0, "leave_stream", result="left_early", status=200)
    calm = _seen(load, 1, "leave_stream", result="left_early", status=200)
    started = kill - timedelta(seconds=1)
    rows = [
        dataclasses.replace(
            _row(reconcile, racing, "upstream_error", 200), created_at=started, latency_ms=1020
        ),
        dataclasses.replace(_row(reconcile, calm, "upstream_error", 200), created_at=started, latency_ms=800),
    ]
    report = reconcile.reconcile([racing, calm], rows, "soak", "m", window)
    assert report.race_accepted == 1
    assert [m.request_id for m in report.mismatches] == [calm.spec.request_id]
    assert json.loads(json.dumps(report.to_json()))["mismatch_details"][0]["row"]["created_at"] == (
        started.isoformat()
    )
    without_outage = reconcile.reconcile([racing, calm], rows, "soak", "m")
    assert (without_outage.race_accepted, len(without_outage.mismatches)) == (0, 2)


def test_a_row_without_model_is_accepted_only_for_a_non_streamed_client_that_left(soak):
    load, reconcile = soak
    json_left = _seen(load, 0, "leave_json", result="left_early")
    stream_left = _seen(load, 1, "leave_stream", result="left_early", status=200)
    rows = [
        dataclasses.replace(_row(reconcile, s, "client_disconnect", 499), model=None, stream=False)
        for s in (json_left, stream_left)
    ]
    report = reconcile.reconcile([json_left, stream_left], rows, "soak", "m")
    assert report.body_unread == 1
    assert [(m.request_id, m.problem) for m in report.mismatches] == [
        (stream_left.spec.request_id, "stream is False, not True")
    ]


def test_read_rows_counts_spilled_rows_with_the_database_rows(soak, tmp_path: Path):
    _, reconcile = soak
    url = f"sqlite:///{tmp_path / 'gw.sqlite'}"
    engine = open_engine(url)
    row = {
        "request_id": "soak-t-000001",
        "created_at": datetime.now(UTC),
        "key_name": "soak",
        "model": "m",
        "route": "/v1/chat/completions",
        "status": 200,
        "outcome": "ok",
        "stream": True,
        "prompt_tokens": 9,
        "completion_tokens": 2,
        "reasoning_tokens": 0,
        "cached_tokens": 0,
        "latency_ms": 1.0,
        "ttft_ms": 0.5,
        "finish_reason": "length",
        "policy_id": None,
    }
    with engine.begin() as connection:
        connection.execute(insert(LedgerRow), [row])
    engine.dispose()
    spilled = {**row, "request_id": "soak-t-000002", "created_at": row["created_at"].isoformat()}
    (tmp_path / "ledger-spill-123.jsonl").write_text(json.dumps(spilled) + "\n")
    rows = reconcile.read_rows(url, tmp_path)
    assert [(r.request_id, r.source, r.completion_tokens) for r in rows] == [
        ("soak-t-000001", "db", 2),
        ("soak-t-000002", "spill", 2),
    ]


def test_the_plan_mixes_every_kind_with_unique_ids(soak):
    load, _ = soak
    specs = load.plan(10_000, "abcd")
    kinds = {kind: sum(s.kind == kind for s in specs) for kind in ("json", *load.KINDS)}
    assert len({s.request_id for s in specs}) == 10_000
    assert 4000 < kinds["json"] < 5000 and 400 < kinds["leave_stream"] < 600 and kinds["leave_json"] > 100
    leaving = next(s for s in specs if s.kind == "leave_json").body("m")
    assert (leaving["stream"], leaving["max_tokens"], leaving["ignore_eos"]) == (False, 512, True)
    asking = next(s for s in specs if s.kind == "stream_usage").body("m")
    assert asking["stream_options"] == {"include_usage": True} and asking["max_tokens"] <= 4
