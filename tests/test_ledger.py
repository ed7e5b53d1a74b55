"""The usage ledger: one row per request with its tokens, timing and outcome (ok, rejected, client left,
upstream failed), counted reasoning for Anthropic thinking, and a writer that loses no row when the
database refuses for a while or for good.

Gateway tests run against the fake upstream of tests/test_gateway_policy.py and read ``usage_ledger``
after stopping the gateway (its lifespan flushes the writer), so the rows counted are all there will be.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, event, func, insert, select
from sqlalchemy.engine import Engine

from serve.gateway import store
from serve.gateway.access import RequestIds
from serve.gateway.ledger import LedgerWriter
from serve.gateway.store import LedgerRow, open_engine
from tests.polling import wait_for
from tests.postgres import new_database
from tests.test_gateway_policy import (
    CHAT_STREAM,
    CHAT_USAGE,
    DELAY_S,
    MESSAGES_USAGE,
    THINKING,
    THINKING_TOKENS,
    Seen,
    add_key,
    chat_body,
    fake_upstream,
    messages_body,
    post,
)

WAIT_S = 20.0  # liveness bound for anything awaited here, far above what it takes


def read_ledger(engine_url: str) -> list[dict[str, Any]]:
    """Every ``usage_ledger`` row at ``engine_url``, oldest first."""
    engine = create_engine(engine_url)
    try:
        with engine.connect() as connection:
            query = select(LedgerRow.__table__).order_by(LedgerRow.id)
            return [dict(row) for row in connection.execute(query).mappings()]
    finally:
        engine.dispose()


def stopped_ledger(gateway: Any) -> dict[str, dict[str, Any]]:
    """Stop ``gateway`` (which flushes its ledger) and return its rows by request id, checking that no
    request id has two rows."""
    gateway.stop()
    rows = read_ledger(gateway.settings.database)
    ids = [row["request_id"] for row in rows]
    assert len(ids) == len(set(ids)), f"duplicated ledger rows: {ids}"
    return {row["request_id"]: row for row in rows}


@pytest.fixture
def upstream(serve_aiohttp: Callable[..., Any]) -> tuple[Any, Seen]:
    app, seen = fake_upstream()
    return serve_aiohttp(app), seen


# --- rows written by the gateway --------------------------------------------------------------------


def test_each_answered_request_has_one_row_with_its_tokens_timing_and_finish(upstream, gateway_factory):
    server, _ = upstream
    gateway, key = gateway_factory(server.url)
    assert post(gateway, key, "/v1/chat/completions", chat_body(mode="delay"), "plain").status_code == 200
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {key}", "x-request-id": "streamed"},
        json=chat_body(stream=True, mode="delay"),
    ) as reply:
        assert b"".join(reply.iter_raw()) == CHAT_STREAM[0] + CHAT_STREAM[1] + CHAT_STREAM[3]
    responses = post(gateway, key, "/v1/responses", {"model": "team-a", "input": "Hi"}, "resp")
    assert responses.status_code == 200
    listing = httpx.get(
        gateway.url + "/v1/models", headers={"authorization": f"Bearer {key}", "x-request-id": "list"}
    )
    assert listing.status_code == 200

    rows = stopped_ledger(gateway)
    assert set(rows) == {"plain", "streamed", "resp", "list"}
    chat_tokens = {
        "prompt_tokens": CHAT_USAGE["prompt_tokens"],
        "completion_tokens": CHAT_USAGE["completion_tokens"],
        "reasoning_tokens": 4,
        "cached_tokens": 3,
    }
    plain = rows["plain"]
    assert {k: plain[k] for k in chat_tokens} == chat_tokens
    assert (plain["key_name"], plain["model"], plain["route"]) == ("tester", "m", "/v1/chat/completions")
    assert (plain["status"], plain["outcome"], plain["stream"], plain["finish_reason"]) == (
        200,
        "ok",
        False,
        "stop",
    )
    assert plain["ttft_ms"] is None
    assert plain["latency_ms"] >= DELAY_S * 1000  # the upstream answered after DELAY_S
    streamed = rows["streamed"]
    assert {k: streamed[k] for k in chat_tokens} == chat_tokens  # from the usage chunk the client never saw
    assert (streamed["status"], streamed["outcome"], streamed["stream"]) == (200, "ok", True)
    assert streamed["finish_reason"] == "length"
    # The first chunk came DELAY_S before the rest, so TTFT is far below the latency (half of DELAY_S
    # leaves room for a busy machine reading the first chunk late).
    assert streamed["ttft_ms"] is not None and streamed["ttft_ms"] > 0
    assert streamed["latency_ms"] - streamed["ttft_ms"] >= DELAY_S * 1000 / 2
    resp = rows["resp"]
    assert (resp["model"], resp["route"], resp["finish_reason"]) == ("team-a", "/v1/responses", "completed")
    assert (
        resp["prompt_tokens"],
        resp["completion_tokens"],
        resp["reasoning_tokens"],
        resp["cached_tokens"],
    ) == (
        8,
        5,
        3,
        2,
    )
    assert (rows["list"]["route"], rows["list"]["status"], rows["list"]["outcome"]) == (
        "/v1/models",
        200,
        "ok",
    )
    for row in rows.values():
        assert row["created_at"] is not None and row["latency_ms"] > 0


def test_refused_requests_have_rejected_rows_and_401s_have_no_key_name(upstream, gateway_factory):
    server, seen = upstream
    gateway, key = gateway_factory(server.url, key_cache_ttl_s=0, max_body_bytes=1024)
    team = add_key(gateway, "team", models=("m",), max_tokens=50)
    # Admits one request (reserves ~30 tokens, settles to 20) and not a second (20 + ~30 > 40).
    budget = add_key(gateway, "budget", budget_day=40)
    path = "/v1/chat/completions"
    expected = {
        "no-key": (post(gateway, None, path, chat_body(), "no-key"), None, 401),
        "bad-key": (post(gateway, key + "x", path, chat_body(), "bad-key"), None, 401),
        "model": (post(gateway, team, path, chat_body("other"), "model"), "team", 403),
        "cap": (post(gateway, team, path, chat_body(max_tokens=51), "cap"), "team", 400),
        "big": (
            post(
                gateway,
                key,
                path,
                chat_body(messages=[{"role": "user", "content": "x" * 2048}]),
                "big",
            ),
            "tester",
            413,
        ),
        "budget-1": (
            post(gateway, budget, path, chat_body(max_tokens=10), "budget-1"),
            "budget",
            200,
        ),
        "budget-2": (
            post(gateway, budget, path, chat_body(max_tokens=10), "budget-2"),
            "budget",
            429,
        ),
    }
    for request_id, (reply, _, status) in expected.items():
        assert reply.status_code == status, (request_id, reply.text)
    rows = stopped_ledger(gateway)
    assert set(rows) == set(expected)
    for request_id, (_, key_name, status) in expected.items():
        row = rows[request_id]
        assert (row["key_name"], row["status"]) == (key_name, status), request_id
        assert row["outcome"] == ("ok" if status == 200 else "rejected"), request_id
        assert row["route"] == path
        if status != 200:
            assert (row["prompt_tokens"], row["completion_tokens"]) == (0, 0), request_id
    assert rows["model"]["model"] == "other"
    assert len(seen.bodies(path)) == 1  # only budget-1 went upstream


def test_clients_that_leave_early_get_client_disconnect_rows_and_the_upstream_is_let_go(
    upstream, gateway_factory
):
    server, seen = upstream
    gateway, key = gateway_factory(server.url)
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {key}", "x-request-id": "left-stream"},
        json=chat_body(stream=True, mode="slow"),
    ) as reply:
        first = next(reply.iter_raw())
        assert b'"Hel"' in first
    # A non-streamed request the client gives up on before the answer.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            gateway.url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {key}", "x-request-id": "left-plain"},
            json=chat_body(mode="slow"),
            timeout=httpx.Timeout(10, read=0.5),
        )
    wait_for(
        lambda: {"left-stream", "left-plain"} <= set(seen.left),
        WAIT_S,
        f"the upstream requests were closed within {WAIT_S} s",
        0.02,
    )
    rows = stopped_ledger(gateway)
    stream, plain = rows["left-stream"], rows["left-plain"]
    for row in (stream, plain):
        assert (row["outcome"], row["status"], row["key_name"], row["model"]) == (
            "client_disconnect",
            499,
            "tester",
            "m",
        )
    assert stream["stream"] is True and plain["stream"] is False
    # The stream had reported usage so far (continuous usage stats): the row keeps it.
    assert (stream["prompt_tokens"], stream["completion_tokens"]) == (11, 1)
    assert stream["ttft_ms"] is not None
    assert (plain["prompt_tokens"], plain["completion_tokens"], plain["ttft_ms"]) == (0, 0, None)


def test_upstream_failures_get_upstream_error_rows_with_the_tokens_so_far(
    upstream, gateway_factory, down_upstream_url
):
    server, _ = upstream
    gateway, key = gateway_factory(server.url)
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {key}", "x-request-id": "broken"},
        json=chat_body(stream=True, mode="break"),
    ) as reply:
        body = b"".join(reply.iter_raw())
    assert b'"upstream_error"' in body and b"[DONE]" not in body
    down, down_key = gateway_factory(down_upstream_url)
    assert post(down, down_key, "/v1/chat/completions", chat_body(), "down").status_code == 503

    broken = stopped_ledger(gateway)["broken"]
    assert (broken["outcome"], broken["status"], broken["stream"]) == ("upstream_error", 200, True)
    assert (broken["prompt_tokens"], broken["completion_tokens"]) == (11, 2)
    assert broken["finish_reason"] is None
    unreachable = stopped_ledger(down)["down"]
    assert (unreachable["outcome"], unreachable["status"], unreachable["key_name"]) == (
        "upstream_error",
        503,
        "tester",
    )
    assert (unreachable["prompt_tokens"], unreachable["completion_tokens"]) == (0, 0)


def test_anthropic_thinking_without_a_reasoning_count_is_counted_with_the_upstreams_tokenizer(
    upstream, gateway_factory
):
    server, seen = upstream
    gateway, key = gateway_factory(server.url)
    assert post(gateway, key, "/v1/messages", messages_body(), "plain").status_code == 200
    with httpx.stream(
        "POST",
        gateway.url + "/v1/messages",
        headers={"x-api-key": key, "x-request-id": "streamed"},
        json=messages_body(stream=True),
    ) as reply:
        assert b"thinking_delta" in b"".join(reply.iter_raw())
    no_thinking = post(gateway, key, "/v1/messages", messages_body(mode="no_thinking"), "none")
    assert no_thinking.status_code == 200

    rows = stopped_ledger(gateway)
    for request_id in ("plain", "streamed"):
        row = rows[request_id]
        assert row["reasoning_tokens"] == THINKING_TOKENS, request_id
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            MESSAGES_USAGE["input_tokens"],
            MESSAGES_USAGE["output_tokens"],
        )
        assert (row["finish_reason"], row["route"]) == ("end_turn", "/v1/messages")
    assert rows["none"]["reasoning_tokens"] == 0
    # One /tokenize per answer with thinking, holding exactly its thinking text, counted for its model.
    counted = [json.loads(body) for body in seen.bodies("/tokenize")]
    assert [c["prompt"] for c in counted] == [THINKING, THINKING]
    assert all(c["model"] == "m" and c["add_special_tokens"] is False for c in counted)


# --- the writer alone -------------------------------------------------------------------------------


def _row(request_id: str) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "created_at": datetime.now(UTC),
        "key_name": "k",
        "model": "m",
        "route": "/v1/chat/completions",
        "status": 200,
        "outcome": "ok",
        "stream": False,
        "prompt_tokens": 1,
        "completion_tokens": 2,
        "reasoning_tokens": 0,
        "cached_tokens": 0,
        "latency_ms": 1.5,
        "ttft_ms": None,
        "finish_reason": "stop",
        "policy_id": None,
    }


class WriteLock:
    """Another connection holding the SQLite file's write lock (as a CLI write or a stuck worker would)."""

    def __init__(self, path: Path) -> None:
        self.connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    def take(self) -> None:
        self.connection.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.connection.execute("COMMIT")


@pytest.fixture
def locked_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Engine, WriteLock, Path]:
    """The gateway's own SQLite engine, with a busy timeout of 0.1 s so a held lock fails an insert at
    once instead of after 30 s, and a ``WriteLock`` on the same file."""
    monkeypatch.setattr(store, "BUSY_TIMEOUT_S", 0.1)
    path = tmp_path / "gateway.sqlite"
    engine = open_engine(f"sqlite:///{path}")
    return engine, WriteLock(path), path


def _ids(path: Path) -> list[str]:
    """Request ids in the ledger at ``path``, read with a plain connection (the gateway's engine takes the
    write lock even to read, so it would wait for the lock the test holds)."""
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return [r[0] for r in connection.execute("SELECT request_id FROM usage_ledger ORDER BY id")]


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {WAIT_S} s"
        await asyncio.sleep(0.02)


def test_rows_wait_out_a_locked_database_and_are_written_when_it_frees(locked_db, tmp_path, caplog):
    engine, lock, path = locked_db

    def refused() -> bool:
        return any("ledger insert" in r.getMessage() for r in caplog.records)

    async def scenario() -> LedgerWriter:
        writer = LedgerWriter(engine, tmp_path, flush_interval_s=0.05)
        writer.start()
        lock.take()
        for i in range(5):
            writer.record(_row(f"r{i}"))
        await _until(refused, "a refused insert")
        assert _ids(path) == []  # readers still read (WAL): nothing was written while locked
        writer.record(_row("r5"))  # recorded during the outage
        await asyncio.sleep(0.3)  # a few more refused retries
        lock.release()
        await _until(lambda: writer.written == 6, "all rows written after the lock went")
        await writer.close()
        return writer

    with caplog.at_level(logging.WARNING, logger="serve.gateway.ledger"):
        writer = asyncio.run(scenario())
    assert _ids(path) == [f"r{i}" for i in range(6)]  # each once, in order
    assert writer.written == 6
    assert list(tmp_path.glob("ledger-spill-*.jsonl")) == []


def test_rows_still_refused_at_close_are_spilled_to_jsonl_and_none_is_lost(locked_db, tmp_path):
    engine, lock, path = locked_db
    spill_dir = tmp_path / "state"

    async def scenario() -> LedgerWriter:
        writer = LedgerWriter(engine, spill_dir, flush_interval_s=0.05)
        writer.start()
        for i in range(3):
            writer.record(_row(f"early{i}"))
        await _until(lambda: writer.written == 3, "the first rows written")
        lock.take()
        for i in range(2):
            writer.record(_row(f"late{i}"))
        await writer.close()  # the database still refuses: the late rows must go to the spill file
        return writer

    writer = asyncio.run(scenario())
    assert writer.written == 3
    assert _ids(path) == ["early0", "early1", "early2"]
    spill = spill_dir / f"ledger-spill-{os.getpid()}.jsonl"
    spilled = [json.loads(line) for line in spill.read_text().splitlines()]
    assert [row["request_id"] for row in spilled] == ["late0", "late1"]
    # Each spilled line is a whole ledger row, ready to insert by hand once the database is back.
    lock.release()
    for row in spilled:
        row["created_at"] = datetime.fromisoformat(row["created_at"])
    with engine.begin() as connection:
        connection.execute(insert(LedgerRow), spilled)
    assert _ids(path) == ["early0", "early1", "early2", "late0", "late1"]
    with engine.connect() as connection:
        assert connection.execute(select(func.sum(LedgerRow.completion_tokens))).scalar() == 10


def test_the_request_paths_row_values_line_up_with_the_ledgers_columns():
    """``ledger_values`` builds a tuple (no dict per request): every value must land in its column."""
    from serve.gateway.keys import KeyPolicy, Principal
    from serve.gateway.ledger import COLUMNS
    from serve.gateway.proxy import Call, ledger_row
    from serve.gateway.routes import ROUTES

    call = Call("rid-1", ROUTES[0], 0.0, time.time())
    call.principal = Principal("alice", "00000000", KeyPolicy())
    call.model, call.status, call.outcome, call.stream, call.ttft_ms = "m", 200, "ok", True, 1.5
    call.client_ip = "203.0.113.9"
    usage = call.usage
    usage.prompt, usage.completion, usage.reasoning, usage.cached, usage.finish_reason = 11, 9, 4, 3, "stop"
    row = ledger_row(call)
    assert tuple(row) == COLUMNS
    assert {k: row[k] for k in COLUMNS if k not in ("created_at", "latency_ms")} == {
        "request_id": "rid-1",
        "key_name": "alice",
        "model": "m",
        "route": ROUTES[0].path,
        "status": 200,
        "outcome": "ok",
        "stream": True,
        "prompt_tokens": 11,
        "completion_tokens": 9,
        "reasoning_tokens": 4,
        "cached_tokens": 3,
        "ttft_ms": 1.5,
        "finish_reason": "stop",
        "policy_id": None,
        "client_ip": "203.0.113.9",
    }


def test_the_writers_own_conversions_store_what_sqlalchemys_insert_stores(tmp_path):
    """The writer formats ``created_at`` and binds ``stream`` itself (cheaper than SQLAlchemy's per-row
    processors): the stored text and types must be the ones an ORM insert stores, or reads and the
    usage report's date grouping would disagree between rows."""
    engine = open_engine(f"sqlite:///{tmp_path / 'ledger.sqlite'}", create=True)
    row = {
        "created_at": datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC),  # no microseconds: still written out
        "key_name": "alice",
        "model": "m",
        "route": "/v1/chat/completions",
        "status": 200,
        "outcome": "ok",
        "stream": True,
        "prompt_tokens": 3,
        "completion_tokens": 5,
        "latency_ms": 12.5,
        "ttft_ms": None,
    }
    writer = LedgerWriter(engine, tmp_path)
    writer.record({**row, "request_id": "writer"})
    writer.record({**row, "request_id": "writer-2", "created_at": datetime(2026, 3, 4, 5, 6, 7, 891, UTC)})
    # The request path records epoch seconds (UTC), rounded to the microsecond as fromtimestamp does.
    epoch = datetime(2026, 3, 4, 5, 6, 7, 891, UTC).timestamp()
    writer.record({**row, "request_id": "writer-epoch", "created_at": epoch})
    writer.record({**row, "request_id": "writer-epoch-2", "created_at": float(int(epoch)) + 0.9999999})
    assert asyncio.run(writer._flush())
    with engine.begin() as connection:
        connection.execute(insert(LedgerRow), [{**row, "request_id": "orm"}])
        connection.execute(
            insert(LedgerRow),
            [{**row, "request_id": "orm-2", "created_at": datetime(2026, 3, 4, 5, 6, 7, 891, UTC)}],
        )
    engine.dispose()
    columns = (
        "created_at, typeof(created_at), stream, typeof(stream), latency_ms, typeof(latency_ms), ttft_ms"
    )
    with contextlib.closing(sqlite3.connect(tmp_path / "ledger.sqlite")) as db:
        stored = {
            rid: db.execute(f"SELECT {columns} FROM usage_ledger WHERE request_id = ?", (rid,)).fetchone()
            for rid in ("writer", "orm", "writer-2", "orm-2", "writer-epoch", "writer-epoch-2")
        }
    assert (
        stored["writer"]
        == stored["orm"]
        == ("2026-03-04 05:06:07.000000", "text", 1, "integer", 12.5, "real", None)
    )
    assert stored["writer-2"] == stored["orm-2"] == stored["writer-epoch"]
    assert stored["writer-2"][0] == "2026-03-04 05:06:07.000891"
    assert stored["writer-epoch-2"][0] == "2026-03-04 05:06:08.000000"


def _write_in_statements(engine: Engine, tmp_path: Path, count: int) -> list[tuple[bool, int]]:
    """Record and flush ``count`` rows; each INSERT the writer ran as (executemany?, parameters)."""
    inserts: list[tuple[bool, int]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def seen(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if statement.startswith("INSERT INTO usage_ledger"):
            inserts.append((many, len(parameters)))

    writer = LedgerWriter(engine, tmp_path)
    created = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    for index in range(count):
        writer.record(
            {
                "request_id": f"rid-{index:05d}",
                "created_at": created,
                "key_name": "alice" if index % 2 else None,
                "model": "m",
                "route": "/v1/chat/completions",
                "status": 200,
                "outcome": "ok",
                "stream": bool(index % 3),
                "prompt_tokens": index,
                "completion_tokens": 2 * index,
                "latency_ms": index / 4,
            }
        )
    assert asyncio.run(writer._flush())
    event.remove(engine, "before_cursor_execute", seen)
    with engine.connect() as connection:
        stored = connection.execute(
            select(
                LedgerRow.request_id,
                LedgerRow.key_name,
                LedgerRow.stream,
                LedgerRow.prompt_tokens,
                LedgerRow.completion_tokens,
                LedgerRow.latency_ms,
            ).order_by(LedgerRow.id)
        ).all()
    assert [tuple(row) for row in stored] == [
        (f"rid-{i:05d}", "alice" if i % 2 else None, bool(i % 3), i, 2 * i, i / 4) for i in range(count)
    ]
    return inserts


def test_a_batch_is_inserted_in_multi_row_statements_within_sqlites_parameter_limit(tmp_path):
    """One statement per row let the DBAPI hand the GIL back and forth with the event loop once per row
    (sqlite3 releases it around every statement it steps): a batch goes in statements of many rows, as
    many as SQLite's limit on bound parameters allows (lowered here to 100 rows' worth), in order, in
    sizes that are powers of two."""
    engine = open_engine(f"sqlite:///{tmp_path / 'ledger.sqlite'}", create=True)
    width = len(LedgerRow.__table__.columns) - 1  # every column but the id

    @event.listens_for(engine, "connect")
    def lower_limit(dbapi_connection: sqlite3.Connection, record: Any) -> None:
        dbapi_connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 100 * width + 5)

    engine.dispose()  # connections opened before the listener would keep the default limit
    inserts = _write_in_statements(engine, tmp_path, 1234)
    engine.dispose()
    # 19 statements of 64 rows (the largest power of two within 100 rows), then 16 and 2.
    assert inserts == [(False, 64 * width)] * 19 + [(False, 16 * width), (False, 2 * width)]


def test_a_batch_is_inserted_in_multi_row_statements_on_postgres(tmp_path, postgres_url):
    with new_database(postgres_url, "ledger") as url:
        engine = open_engine(url, create=True)
        try:
            inserts = _write_in_statements(engine, tmp_path, 1234)
        finally:
            engine.dispose()
    width = len(LedgerRow.__table__.columns) - 1
    # 4 x 256 + 128 + 64 + 16 + 2 (sizes are powers of two: a connection caches few statements)
    assert inserts == [(False, n * width) for n in (256, 256, 256, 256, 128, 64, 16, 2)]


def test_epoch_seconds_from_the_request_path_are_stored_as_their_utc_time_on_postgres(tmp_path, postgres_url):
    """The request path records ``created_at`` as epoch seconds; on Postgres the writer binds it as the
    aware datetime it stands for (psycopg would refuse a float for a ``timestamptz``)."""
    epoch = datetime(2026, 3, 4, 5, 6, 7, 891, UTC).timestamp()
    with new_database(postgres_url, "ledger_epoch") as url:
        engine = open_engine(url, create=True)
        try:
            writer = LedgerWriter(engine, tmp_path)
            writer.record(
                {
                    "request_id": "epoch",
                    "created_at": epoch,
                    "route": "/v1/chat/completions",
                    "status": 200,
                    "outcome": "ok",
                    "stream": False,
                    "latency_ms": 1.0,
                }
            )
            assert asyncio.run(writer._flush())
            with engine.connect() as connection:
                stored = connection.execute(select(LedgerRow.created_at)).scalar_one()
        finally:
            engine.dispose()
    assert stored == datetime(2026, 3, 4, 5, 6, 7, 891, UTC)


def test_new_request_ids_are_uuid7_and_sort_by_time_so_the_ledger_index_appends():
    """The gateway's own request ids are UUIDv7 (RFC 9562): made a millisecond apart or more they sort in
    the order they were made, so the ``request_id`` index of a large ledger grows at its end (random ids
    scatter its pages; see ``RequestIds`` for what that cost)."""
    request_ids = RequestIds()
    ids = []
    for _ in range(20):
        ids.append(request_ids.new())
        time.sleep(0.002)
    assert ids == sorted(ids)
    parsed = [uuid.UUID(value) for value in ids]
    assert all(value.version == 7 and value.variant == uuid.RFC_4122 for value in parsed)
    assert all(len(value) == 32 and value == value.lower() for value in ids)
    made_at_ms = int(ids[0][:12], 16)
    assert abs(made_at_ms - (time.time() - 0.04) * 1000) < 5_000


def test_request_ids_stay_unique_and_well_formed_across_random_pool_refills():
    """Ids come from a pool of random bytes drawn ``POOL_IDS`` at a time: every id of several pools,
    the ones either side of a refill included, is a distinct UUIDv7 whose random bits are not all alike."""
    request_ids = RequestIds()
    count = RequestIds.POOL_IDS * 40 + 3
    ids = [request_ids.new() for _ in range(count)]
    assert len(set(ids)) == count
    parsed = [uuid.UUID(value) for value in ids]
    assert all(value.version == 7 and value.variant == uuid.RFC_4122 for value in parsed)
    random_parts = {value[12:] for value in ids}
    assert len(random_parts) == count  # the random part alone differs (ids of one millisecond)
    # Each hex digit of rand_b takes many values: the pool is random bytes, not a repeated or zeroed one.
    assert all(len({value[20 + i] for value in ids}) == 16 for i in range(12))
