"""SQLite set-up of the gateway's database: gateway workers that open a new file together all get it in
WAL mode (serve/gateway/store.py ``_ensure_wal``)."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from serve.gateway.store import _ensure_wal, open_engine


def test_switching_to_wal_waits_for_a_reader_instead_of_failing(tmp_path: Path) -> None:
    """SQLite refuses the switch at once while another connection reads (no busy wait with timeout 0,
    and none at all when both hold a shared lock); the switch is retried until the reader is done."""
    path = tmp_path / "k.sqlite"
    setup = sqlite3.connect(path)
    setup.execute("CREATE TABLE t (x)")
    setup.commit()
    setup.close()
    reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    reader.execute("BEGIN")
    reader.execute("SELECT * FROM t").fetchall()  # a shared lock until the COMMIT below
    threading.Timer(0.3, lambda: reader.execute("COMMIT")).start()
    switcher = sqlite3.connect(path, timeout=0, isolation_level=None)
    started = time.monotonic()
    _ensure_wal(switcher.cursor())
    assert time.monotonic() - started >= 0.2  # it waited for the reader
    assert switcher.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    switcher.close()
    reader.close()


def test_many_connections_opening_a_new_database_together_all_succeed(tmp_path: Path) -> None:
    for trial in range(10):
        path = tmp_path / f"k{trial}.sqlite"
        path.touch()
        barrier = threading.Barrier(6)
        errors: list[str] = []

        def open_it(
            path: Path = path, barrier: threading.Barrier = barrier, errors: list[str] = errors
        ) -> None:
            barrier.wait()
            try:
                open_engine(f"sqlite:///{path}").dispose()
            except Exception as exc:  # what the test reports
                errors.append(repr(exc))

        threads = [threading.Thread(target=open_it) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, f"trial {trial}: {errors}"
        assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
