"""``GET /v1/usage`` and ``kit usage``: a key's own totals per model and UTC day (reasoning tokens apart),
everyone's for an admin key, read from the ledger the gateway wrote for real requests.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import insert

from serve.cli import main as kit
from serve.gateway.keys import KeyPolicy, KeyStore
from serve.gateway.store import LedgerRow, open_engine
from serve.gateway.usage_report import COLUMNS
from tests.test_gateway_policy import Seen, add_key, chat_body, fake_upstream, post

WAIT_S = 20.0  # liveness bound for the ledger's batches to land, far above ledger_flush_interval_s

# Per request, from the fake upstream: (prompt, completion, reasoning, cached) tokens.
CHAT = (11, 9, 4, 3)
RESPONSES = (8, 5, 3, 2)


def expected(requests: int, *tokens: tuple[int, ...]) -> dict[str, int]:
    """The ``COLUMNS`` of a usage row made of ``requests`` requests with these token counts."""
    summed = [sum(t[i] for t in tokens) for i in range(4)]
    return dict(zip(COLUMNS, (requests, 0, *summed), strict=True))


def today() -> set[str]:
    """Today's UTC date, and tomorrow's should the test run across midnight."""
    now = datetime.now(UTC)
    return {f"{now:%Y-%m-%d}", f"{now + timedelta(minutes=5):%Y-%m-%d}"}


def usage(gateway: Any, key: str | None, query: str = "") -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{gateway.url}/v1/usage{query}", headers=headers, timeout=30)


def by_key_and_model(reply: httpx.Response) -> dict[tuple[str, str], dict[str, int]]:
    """A 200 usage answer's rows (all dated today) as ``(key, model) -> COLUMNS``; checks its totals."""
    assert reply.status_code == 200, reply.text
    body = reply.json()
    rows = body["data"]
    assert {row["date"] for row in rows} <= today()
    assert body["totals"] == {c: sum(row[c] for row in rows) for c in COLUMNS}
    return {(row["key"], row["model"]): {c: row[c] for c in COLUMNS} for row in rows}


def wait_for_requests(gateway: Any, admin: str, count: int) -> None:
    """Wait until the ledger holds ``count`` requests with a key (rows land in batches)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        reply = usage(gateway, admin)
        assert reply.status_code == 200, reply.text
        if reply.json()["totals"]["requests"] >= count:
            assert reply.json()["totals"]["requests"] == count
            return
        assert time.monotonic() < deadline, f"{count} requests in the ledger within {WAIT_S} s"
        time.sleep(0.05)


@pytest.fixture
def used(
    serve_aiohttp: Callable[..., Any], gateway_factory: Callable[..., tuple[Any, str]]
) -> tuple[Any, dict[str, str], Seen]:
    """A gateway whose ledger holds: tester 2 chats on m, 1 on team-a, 1 response on m; bob 1 chat on m;
    one request without a key. Returns it, the keys by name (``admin`` included) and the upstream."""
    app, seen = fake_upstream()
    server = serve_aiohttp(app)
    gateway, tester = gateway_factory(server.url, key_cache_ttl_s=0)
    keys = {"tester": tester, "bob": add_key(gateway, "bob"), "admin": add_key(gateway, "admin", admin=True)}
    for model in ("m", "m", "team-a"):
        assert post(gateway, tester, "/v1/chat/completions", chat_body(model)).status_code == 200
    assert post(gateway, tester, "/v1/responses", {"model": "m", "input": "Hi"}).status_code == 200
    assert post(gateway, keys["bob"], "/v1/chat/completions", chat_body()).status_code == 200
    assert post(gateway, None, "/v1/chat/completions", chat_body()).status_code == 401
    wait_for_requests(gateway, keys["admin"], 5)
    return gateway, keys, seen


TESTER = {
    ("tester", "m"): expected(3, CHAT, CHAT, RESPONSES),
    ("tester", "team-a"): expected(1, CHAT),
}
BOB = {("bob", "m"): expected(1, CHAT)}


def test_an_ordinary_key_reads_only_its_own_totals_per_model_and_day(used):
    gateway, keys, seen = used
    own = by_key_and_model(usage(gateway, keys["tester"]))
    assert own == TESTER
    assert own[("tester", "m")]["reasoning_tokens"] == 11  # apart from completion tokens, which hold them
    assert by_key_and_model(usage(gateway, keys["tester"], "?key=tester")) == TESTER
    assert by_key_and_model(usage(gateway, keys["bob"])) == BOB
    refused = usage(gateway, keys["tester"], "?key=bob")
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "not_admin" and refused.json()["error"]["param"] == "key"
    assert usage(gateway, None).status_code == 401
    assert "/v1/usage" not in seen.paths()  # the gateway answers it itself


def test_an_admin_key_sees_every_key_and_can_filter_by_one(used):
    gateway, keys, _ = used
    assert by_key_and_model(usage(gateway, keys["admin"])) == {**TESTER, **BOB}
    assert by_key_and_model(usage(gateway, keys["admin"], "?key=bob")) == BOB
    assert by_key_and_model(usage(gateway, keys["admin"], "?key=nobody")) == {}


@pytest.mark.parametrize("days", ["0", "367", "-1", "1.5", "abc", "1e3", ""])
def test_a_bad_days_parameter_is_400(used, days):
    gateway, keys, _ = used
    reply = usage(gateway, keys["tester"], f"?days={days}")
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "days"
    assert "1 to 366" in reply.json()["error"]["message"]


def test_usage_is_per_utc_day_and_days_bounds_it(used):
    gateway, keys, _ = used
    now = datetime.now(UTC)
    old_day = now - timedelta(days=3)
    engine = open_engine(gateway.settings.database)
    with engine.begin() as connection:
        connection.execute(
            insert(LedgerRow),
            [
                {
                    "request_id": f"old-{i}",
                    "created_at": when,
                    "key_name": "tester",
                    "model": "m",
                    "route": "/v1/chat/completions",
                    "status": 200,
                    "outcome": "ok",
                    "stream": False,
                    "prompt_tokens": 100,
                    "completion_tokens": 10,
                    "reasoning_tokens": 1,
                    "cached_tokens": 0,
                    "latency_ms": 1.0,
                }
                for i, when in enumerate((old_day, now - timedelta(days=40)))
            ],
        )
    engine.dispose()
    assert by_key_and_model(usage(gateway, keys["tester"], "?days=1")) == TESTER
    week = usage(gateway, keys["tester"], "?days=7").json()["data"]
    past = [row for row in week if row["date"] == f"{old_day:%Y-%m-%d}"]
    assert [(row["key"], row["model"], row["requests"], row["prompt_tokens"]) for row in past] == [
        ("tester", "m", 1, 100)
    ]
    assert len(week) == 3  # today's two models, and the day three days back
    assert sum(row["requests"] for row in usage(gateway, keys["tester"]).json()["data"]) == 5  # 30 days
    assert sum(row["requests"] for row in usage(gateway, keys["tester"], "?days=366").json()["data"]) == 6


def _table(out: str) -> tuple[dict[tuple[str, str], dict[str, int]], dict[str, int]]:
    """``kit usage``'s table as ``(key, model) -> COLUMNS`` (rows dated today) and its total line."""
    lines = out.strip().splitlines()
    assert lines[0].split() == [
        "date",
        "key",
        "model",
        "requests",
        "refused",
        "prompt",
        "completion",
        "reasoning",
        "cached",
    ]
    rows: dict[tuple[str, str], dict[str, int]] = {}
    for line in lines[1:-1]:
        date, key, model, *numbers = line.split()
        assert date in today()
        rows[(key, model)] = dict(zip(COLUMNS, map(int, numbers), strict=True))
    total_word, *totals = lines[-1].split()
    assert total_word == "total"
    return rows, dict(zip(COLUMNS, map(int, totals), strict=True))


def test_kit_usage_prints_the_same_totals_as_a_table(used, monkeypatch, capsys):
    gateway, keys, _ = used
    monkeypatch.setenv("KIT_GATEWAY_KEYS_DB", str(gateway.settings.keys_db))
    api = usage(gateway, keys["admin"]).json()
    assert kit(["usage"]) == 0
    rows, totals = _table(capsys.readouterr().out)
    assert rows == {**TESTER, **BOB}
    assert totals == api["totals"]
    assert kit(["usage", "--key", "bob", "--days", "1"]) == 0
    assert _table(capsys.readouterr().out) == (BOB, BOB[("bob", "m")])
    assert kit(["usage", "--key", "nobody"]) == 0
    assert "no usage by key 'nobody'" in capsys.readouterr().out
    assert kit(["usage", "--days", "0"]) == 1
    assert "--days 0" in capsys.readouterr().err


def test_usage_on_a_postgres_store(serve_aiohttp, gateway_factory, postgres_url):
    # The same report from Postgres (date() of a timestamptz, sums): what a team with several gateway
    # hosts reads. Names are unique: the server is shared by the whole test session.
    app, _ = fake_upstream()
    server = serve_aiohttp(app)
    gateway, _ = gateway_factory(server.url, database_url=postgres_url, key_cache_ttl_s=0)
    store = KeyStore(postgres_url)
    name = f"pg-{uuid.uuid4().hex[:8]}"
    key = store.create(name)
    admin = store.create(f"pg-admin-{uuid.uuid4().hex[:8]}", KeyPolicy(admin=True))
    for _ in range(2):
        assert post(gateway, key, "/v1/chat/completions", chat_body()).status_code == 200
    deadline = time.monotonic() + WAIT_S
    while (reply := usage(gateway, key)).json()["totals"]["requests"] < 2:
        assert time.monotonic() < deadline, f"2 requests in the ledger within {WAIT_S} s"
        time.sleep(0.05)
    assert by_key_and_model(reply) == {(name, "m"): expected(2, CHAT, CHAT)}
    assert by_key_and_model(usage(gateway, admin, f"?key={name}")) == {(name, "m"): expected(2, CHAT, CHAT)}


def test_refused_requests_are_counted_apart_from_served_ones(tmp_path):
    from datetime import UTC, datetime

    from sqlalchemy import insert

    from serve.gateway.store import LedgerRow, open_engine
    from serve.gateway.usage_report import render_table, usage_rows

    engine = open_engine(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    now = datetime.now(UTC)
    base = dict(
        created_at=now,
        key_name="alice",
        model="m",
        route="/v1/chat/completions",
        stream=False,
        latency_ms=1.0,
        prompt_tokens=0,
        completion_tokens=0,
        reasoning_tokens=0,
        cached_tokens=0,
    )
    rows = [
        {
            **base,
            "request_id": "a",
            "status": 200,
            "outcome": "ok",
            "prompt_tokens": 5,
            "completion_tokens": 7,
        },
        {**base, "request_id": "b", "status": 429, "outcome": "rejected"},
        {**base, "request_id": "c", "status": 400, "outcome": "rejected"},
        {**base, "request_id": "d", "status": 499, "outcome": "client_disconnect", "prompt_tokens": 5},
    ]
    with engine.begin() as connection:
        connection.execute(insert(LedgerRow), rows)
    [row] = usage_rows(engine, key="alice", days=1)
    assert (row["requests"], row["refused"], row["prompt_tokens"], row["completion_tokens"]) == (2, 2, 10, 7)
    assert "refused" in render_table([row]).splitlines()[0]
