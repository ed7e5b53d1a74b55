"""The throwaway PostgreSQL of tests/postgres.py is a real server: its version, DDL, and row locks that
serialise two transactions (what the gateway's limits rely on); it is gone after the block, even on failure.
"""

from __future__ import annotations

import os
import queue
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import Engine, create_engine, text

from tests import postgres
from tests.postgres import throwaway_postgres

WAIT_S = 10.0


@pytest.fixture
def engine(postgres_url: str) -> Iterator[Engine]:
    engine = create_engine(postgres_url)
    yield engine
    engine.dispose()


@pytest.fixture
def budget(engine: Engine) -> Iterator[str]:
    """A table of its own (the server is shared by the session) with one row: alice has 10 left."""
    table = f"budget_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(text(f"create table {table} (key text primary key, remaining integer not null)"))
        conn.execute(text(f"insert into {table} values ('alice', 10)"))
    yield table
    with engine.begin() as conn:
        conn.execute(text(f"drop table {table}"))


def test_it_is_a_real_postgresql(engine: Engine, budget: str) -> None:
    assert (engine.dialect.name, engine.dialect.driver) == ("postgresql", "psycopg")
    with engine.connect() as conn:
        assert "PostgreSQL" in conn.execute(text("select version()")).scalar_one()
        assert conn.execute(text(f"select remaining from {budget} where key = 'alice'")).scalar_one() == 10


def _wait_until_blocked(engine: Engine, pid: int, by: int) -> None:
    """Until backend ``pid`` waits for a lock held by backend ``by`` (asked of the server, not timed)."""
    deadline = time.monotonic() + WAIT_S
    with engine.connect() as observer:
        while observer.execute(text("select pg_blocking_pids(:pid)"), {"pid": pid}).scalar_one() != [by]:
            assert time.monotonic() < deadline, f"backend {pid} never waited for backend {by}"
            time.sleep(0.02)


def test_select_for_update_serialises_two_transactions(engine: Engine, budget: str) -> None:
    lock_row = text(f"select remaining from {budget} where key = 'alice' for update")
    spend_one = text(f"update {budget} set remaining = remaining - 1 where key = 'alice'")
    second_pid: queue.Queue[int] = queue.Queue()

    def second_transaction() -> int:
        with engine.begin() as conn:
            conn.execute(text("set local lock_timeout = '30s'"))  # never hang the suite
            second_pid.put(conn.execute(text("select pg_backend_pid()")).scalar_one())
            seen = conn.execute(lock_row).scalar_one()
            conn.execute(spend_one)
            return seen

    # The pool outlives the first connection: closing that connection releases its lock.
    with ThreadPoolExecutor(1) as pool, engine.connect() as first:
        with first.begin():
            first_pid = first.execute(text("select pg_backend_pid()")).scalar_one()
            assert first.execute(lock_row).scalar_one() == 10
            second = pool.submit(second_transaction)
            _wait_until_blocked(engine, second_pid.get(timeout=WAIT_S), by=first_pid)
            assert not second.done()
            first.execute(spend_one)
        # The first committed: the second now reads its write, not the 10 it would have read unlocked.
        assert second.result(timeout=WAIT_S) == 9
    with engine.connect() as conn:
        assert conn.execute(text(f"select remaining from {budget}")).scalar_one() == 8


def test_the_server_is_stopped_and_removed_even_when_the_block_fails() -> None:
    with pytest.raises(RuntimeError, match="the test failed"), throwaway_postgres() as pg:
        os.kill(pg.pid, 0)  # running
        assert (pg.folder / "data" / "PG_VERSION").is_file()
        raise RuntimeError("the test failed")
    assert not pg.folder.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pg.pid, 0)


def test_a_server_that_cannot_start_fails_with_its_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(postgres.SERVER_SETTINGS, "shared_buffers", "nonsense")
    failed = pytest.raises(pytest.fail.Exception, match='invalid value for parameter "shared_buffers"')
    with failed, throwaway_postgres():
        pass
