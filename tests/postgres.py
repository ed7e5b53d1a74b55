"""A throwaway PostgreSQL server for tests: ``initdb`` in a temp folder, ``postgres`` on a Unix socket there.

The binaries come from the ``pgserver`` wheel (PostgreSQL 16, in the ``dev`` extra), so ``make setup`` is
all a machine needs: no system package, no Docker. Only its files are used, not its Python API, which as
root adds a system user and widens the permissions of every parent folder. Postgres refuses to run as
root, so under root the server runs as ``nobody``; its folder (socket included) is then readable by
``nobody`` and root only, which is what makes ``trust`` authentication safe here.

    with throwaway_postgres() as pg:      # or the session fixture ``postgres_url`` in conftest.py
        engine = sqlalchemy.create_engine(pg.url)

The server is stopped and its folder removed when the block ends, however it ends. A server that cannot
start fails the test with the reason and the server's log: these tests never skip.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest
from sqlalchemy import URL, create_engine, text
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

# Names the socket file (.s.PGSQL.5432) only: the server listens on no TCP address, so ports never clash.
PORT = 5432
SUPERUSER = "postgres"
# The account that runs the server when the tests run as root; it exists on every Debian/RHEL image.
UNPRIVILEGED_ACCOUNT = "nobody"
START_TIMEOUT_S = 60.0  # initdb + start take ~1-2 s on 2 cores; the margin is for a loaded CI machine
STOP_TIMEOUT_S = 15.0
# Speed over durability: the cluster is deleted at the end anyway.
SERVER_SETTINGS = {
    "listen_addresses": "",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


@dataclass(frozen=True)
class PostgresServer:
    """A running throwaway server."""

    url: str
    """SQLAlchemy URL (``postgresql+psycopg://postgres@/postgres?host=<folder>&port=5432``)."""
    folder: Path
    """Holds the data directory, the socket and ``postgres.log``; removed at the end."""
    pid: int
    start_seconds: float
    """initdb + start until the first connection succeeds."""


def _fail(message: str) -> NoReturn:
    pytest.fail(f"throwaway PostgreSQL: {message}", pytrace=False)


def bin_dir() -> Path:
    """The folder with ``initdb`` and ``postgres`` inside the installed pgserver wheel."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        _fail("the pgserver package (the PostgreSQL binaries) is not installed; run `make setup`")
    found = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    missing = [name for name in ("initdb", "postgres") if not (found / name).is_file()]
    if missing:
        _fail(f"{found} has no {', '.join(missing)}: the pgserver install is broken; run `make setup`")
    return found


def _closed_folder(path: Path) -> Path | None:
    """The first folder from / down to ``path`` that other users cannot enter, if any."""
    for folder in [*reversed(path.parents), path]:
        if not folder.stat().st_mode & stat.S_IXOTH:
            return folder
    return None


def _account() -> pwd.struct_passwd | None:
    """The account to run the server as: ``nobody`` under root, else None (the current user)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(UNPRIVILEGED_ACCOUNT)
    except KeyError:
        _fail(f"running as root, and there is no '{UNPRIVILEGED_ACCOUNT}' account to run the server as")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"(no log: {err})"


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Fast shutdown (SIGINT: roll back, disconnect, checkpoint); immediate, then kill, if it hangs."""
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL):
        if process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            log.warning("postgres (pid %d) alive %.0f s after %s", process.pid, STOP_TIMEOUT_S, sig.name)


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[PostgresServer]:
    """Start a new PostgreSQL cluster in a temp folder; stop it and remove the folder at the end.

    Yields:
        The running server; ``url`` is ready for ``sqlalchemy.create_engine``.

    Raises:
        pytest.fail.Exception: when the server cannot start, with the reason and the server log.
    """
    binaries = bin_dir()
    account = _account()
    # Under root: run as `nobody` with its own group and no supplementary groups.
    as_account: dict[str, object] = {}
    if account is not None:
        for needed in (binaries, Path(tempfile.gettempdir())):
            closed = _closed_folder(needed)
            if closed is not None:
                _fail(
                    f"running as root, the server runs as '{account.pw_name}', which cannot enter {closed} "
                    f"(on the way to {needed}); allow it with `chmod o+x {closed}` or use a checkout "
                    "(or TMPDIR) under a folder other users can enter"
                )
        as_account = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    started = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="kit-pg-"))
    server_log = folder / "postgres.log"
    process: subprocess.Popen[bytes] | None = None
    try:
        if account is not None:
            os.chown(folder, account.pw_uid, account.pw_gid)
        initdb = subprocess.run(
            [
                binaries / "initdb",
                f"--pgdata={folder / 'data'}",
                f"--username={SUPERUSER}",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            cwd=folder,
            capture_output=True,
            text=True,
            check=False,
            **as_account,
        )
        if initdb.returncode != 0:
            _fail(f"initdb exited with {initdb.returncode}:\n{initdb.stdout}{initdb.stderr}")
        settings = [arg for key, value in SERVER_SETTINGS.items() for arg in ("-c", f"{key}={value}")]
        with server_log.open("wb") as log_file:
            process = subprocess.Popen(
                [binaries / "postgres", "-D", folder / "data", "-p", str(PORT), "-k", folder, *settings],
                cwd=folder,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C meant for pytest must not stop it before the tests' teardown.
                start_new_session=True,
                **as_account,
            )
        deadline = started + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                _fail(f"postgres exited with {process.returncode} on start; its log:\n{_tail(server_log)}")
            try:
                psycopg.connect(host=str(folder), port=PORT, user=SUPERUSER, dbname="postgres").close()
                break
            except psycopg.OperationalError as err:
                if time.monotonic() > deadline:
                    _fail(
                        f"no connection within {START_TIMEOUT_S:.0f} s ({err}); its log:\n{_tail(server_log)}"
                    )
                time.sleep(0.05)
        url = URL.create(
            "postgresql+psycopg",
            username=SUPERUSER,
            database="postgres",
            query={"host": str(folder), "port": str(PORT)},
        )
        server = PostgresServer(
            url=url.render_as_string(hide_password=False),
            folder=folder,
            pid=process.pid,
            start_seconds=time.monotonic() - started,
        )
        log.info("throwaway PostgreSQL up in %.2f s at %s", server.start_seconds, folder)
        yield server
    finally:
        stopping = time.monotonic()
        if process is not None:
            _stop(process)
        shutil.rmtree(folder, ignore_errors=True)
        if folder.exists():
            log.warning("could not remove %s completely", folder)
        log.info("throwaway PostgreSQL stopped and removed in %.2f s", time.monotonic() - stopping)


@contextlib.contextmanager
def new_database(server_url: str, prefix: str) -> Iterator[str]:
    """A new, empty database ``<prefix>_<12 hex>`` on the server at ``server_url`` (a SQLAlchemy URL such
    as the ``postgres_url`` fixture's), so no test sees another's rows; dropped at the end even while
    connections to it are open (``WITH (FORCE)``).

    Yields:
        The database's SQLAlchemy URL, password included (for a gateway's ``KIT_GATEWAY_DATABASE_URL``).
    """
    server = make_url(server_url)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f"CREATE DATABASE {name}"))
        try:
            yield server.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:
                connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    finally:
        admin.dispose()
