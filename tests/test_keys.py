"""API keys: shown once, stored hashed, revocable, checked by key id + constant-time comparison; each
carries its policy, may expire, and may be rotated (old and new secret both valid for a grace period).
Workers trust their copy of the keys for ``ttl_s``, and take up a change within one read after it."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import stat
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from serve.cli import main as kit
from serve.gateway import keys, store
from serve.gateway.keys import KeyCache, KeyError_, KeyInfo, KeyPolicy, KeyStore, Principal


class Clock:
    """Stands in for the ``time`` module of serve.gateway.keys: monotonic and wall time that move only
    when the test says, so "inside the TTL" and "after it" do not depend on how fast the machine is."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = time.time()

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(keys, "time", fake)
    return fake


def test_keys_are_stored_only_as_hashes_in_a_private_file(tmp_path):
    store_ = KeyStore(tmp_path / "state" / "keys.sqlite")
    key = store_.create("alice")
    raw = (tmp_path / "state" / "keys.sqlite").read_bytes()
    secret = key.split("_", 1)[1]
    assert secret.encode() not in raw and key.encode() not in raw
    assert stat.S_IMODE((tmp_path / "state" / "keys.sqlite").stat().st_mode) == 0o600
    assert store_.lookup(key) == "alice"


def test_wrong_malformed_and_revoked_keys_are_rejected(tmp_path):
    store_ = KeyStore(tmp_path / "keys.sqlite", ttl_s=0)
    key = store_.create("alice")
    other = store_.create("bob")
    assert store_.lookup(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store_.lookup(key.replace("sk-kit-", "sk-")) is None
    assert store_.lookup("") is None
    assert store_.lookup(other) == "bob"
    store_.revoke("alice")
    assert store_.lookup(key) is None
    assert store_.lookup(other) == "bob"
    assert [(k.name, k.revoked_at is not None) for k in store_.list()] == [("alice", True), ("bob", False)]


def test_a_worker_trusts_its_copy_inside_the_ttl_and_drops_a_revoked_key_after_it(tmp_path, clock):
    admin = KeyStore(tmp_path / "keys.sqlite")
    key = admin.create("alice")
    worker = KeyStore(tmp_path / "keys.sqlite", ttl_s=2.0)
    assert worker.lookup(key) == "alice"
    admin.revoke("alice")
    clock.advance(1.9)
    assert worker.lookup(key) == "alice"  # inside the TTL the worker answers from its copy
    clock.advance(0.2)
    assert worker.lookup(key) is None  # past it, the copy is reloaded without the key


async def _next_copy(cache: KeyCache, key: str, old: Principal | None) -> Principal | None:
    """What ``cache`` answers for ``key`` once its answer differs from ``old`` (the reload runs in a
    thread; the test does not wait on the cache's internals)."""
    deadline = time.monotonic() + 10
    while (principal := await cache.authenticate(key)) == old:
        assert time.monotonic() < deadline, "the key cache did not reload within 10 s past its TTL"
        await asyncio.sleep(0.01)
    return principal


def test_the_gateways_key_cache_picks_up_revocations_and_policy_changes_after_the_ttl(tmp_path, clock):
    admin = KeyStore(tmp_path / "keys.sqlite")
    alice = admin.create("alice", KeyPolicy(rpm=5))
    bob = admin.create("bob")

    async def scenario() -> None:
        cache = KeyCache(KeyStore(tmp_path / "keys.sqlite", ttl_s=2.0))
        first = await cache.authenticate(alice)
        assert first == Principal("alice", alice[7:15], KeyPolicy(rpm=5))
        bob_before = await cache.authenticate(bob)
        assert bob_before is not None
        admin.revoke("bob")
        admin.set_policy("alice", rpm=60, models=("m",))
        clock.advance(1.9)
        for _ in range(3):  # inside the TTL the copy answers, however often it is asked
            assert await cache.authenticate(alice) == first
            assert await cache.authenticate(bob) == bob_before
            await asyncio.sleep(0.01)
        clock.advance(0.2)
        # Past the TTL the worker reads the keys again in a thread; requests meanwhile use the old copy.
        assert await cache.authenticate(alice) == first
        changed = await _next_copy(cache, alice, first)
        assert changed is not None and changed.policy == KeyPolicy(rpm=60, models=("m",))
        assert await cache.authenticate(bob) is None

    asyncio.run(scenario())


def test_the_key_cache_keeps_its_copy_when_the_database_fails_and_has_none_to_keep_at_first(
    tmp_path, clock, monkeypatch
):
    admin = KeyStore(tmp_path / "keys.sqlite")
    key = admin.create("alice")

    def broken() -> None:
        raise OperationalError("SELECT ...", {}, Exception("database is locked"))

    async def scenario() -> None:
        fresh = KeyCache(KeyStore(tmp_path / "keys.sqlite", ttl_s=2.0))
        monkeypatch.setattr(fresh.store, "load_active", broken)
        with pytest.raises(OperationalError):  # nothing loaded yet: the gateway answers 500
            await fresh.authenticate(key)
        cache = KeyCache(KeyStore(tmp_path / "keys.sqlite", ttl_s=2.0))
        assert (await cache.authenticate(key)) is not None
        monkeypatch.setattr(cache.store, "load_active", broken)
        clock.advance(5)
        principal = await cache.authenticate(key)
        assert principal is not None and principal.name == "alice"

    asyncio.run(scenario())


def test_reading_keys_does_not_wait_for_a_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "BUSY_TIMEOUT_S", 0.2)  # fail fast instead of after 30 s
    path = tmp_path / "keys.sqlite"
    key = KeyStore(path).create("alice")
    reader = KeyStore(path, ttl_s=0)
    assert reader.engine is not None  # opened (tables checked) before the writer takes the lock
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # e.g. a `kit key create`, or another worker's limit counters
    try:
        assert reader.lookup(key) == "alice"
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_duplicate_and_invalid_names_and_unknown_revokes_are_clear_errors(tmp_path):
    store_ = KeyStore(tmp_path / "keys.sqlite")
    store_.create("alice")
    with pytest.raises(KeyError_, match="already exists"):
        store_.create("alice")
    with pytest.raises(KeyError_, match="invalid key name"):
        store_.create("no spaces")
    with pytest.raises(KeyError_, match="no active key"):
        store_.revoke("carol")


def test_a_revoked_name_can_be_reused_and_only_the_new_key_works(tmp_path):
    store_ = KeyStore(tmp_path / "keys.sqlite", ttl_s=0)
    old = store_.create("alice")
    store_.revoke("alice")
    with pytest.raises(KeyError_, match="no active key"):
        store_.revoke("alice")
    new = store_.create("alice")
    assert store_.lookup(new) == "alice"
    assert store_.lookup(old) is None
    assert [(k.name, k.revoked_at is None) for k in store_.list()] == [("alice", False), ("alice", True)]


# --- policy ------------------------------------------------------------------------------------------


def test_a_policy_is_stored_with_its_key_and_loaded_with_it(tmp_path):
    policy = KeyPolicy(
        models=("m", "team-*"),
        rpm=5,
        tpm=100,
        max_concurrent=2,
        budget_day=1000,
        budget_month=20000,
        max_tokens=256,
        clamp_max_tokens=True,
        max_n=2,
        enable_thinking=False,
        admin=True,
    )
    store_ = KeyStore(tmp_path / "keys.sqlite")
    key = store_.create("alice", policy)
    store_.create("bob")
    assert [(k.name, k.policy) for k in store_.list()] == [("alice", policy), ("bob", KeyPolicy())]
    loaded = {principal.name: principal for _, principal, _ in store_.load_active().values()}
    assert loaded["alice"] == Principal("alice", key[7:15], policy)
    assert loaded["bob"].policy == KeyPolicy()


def test_policy_models_are_globs_and_the_default_allows_every_model():
    team = KeyPolicy(models=("m", "team-*"))
    assert [team.allows(m) for m in ("m", "team-a", "team-", "team", "xteam-a", "m2", "M")] == [
        True,
        True,
        True,
        False,
        False,
        False,
        False,
    ]
    assert KeyPolicy().allows("anything/at-all")
    assert KeyPolicy(models=("adapter-?",)).allows("adapter-1")
    assert not KeyPolicy(models=()).allows("m")


def test_only_rate_and_budget_limits_make_a_key_limited_and_describe_shows_what_is_set():
    assert not KeyPolicy().limited
    assert not KeyPolicy(max_tokens=100, max_n=1, models=("m",)).limited  # caps need no counters
    for field in ("rpm", "tpm", "max_concurrent", "budget_day", "budget_month"):
        assert KeyPolicy(**{field: 1}).limited, field
    assert KeyPolicy().describe() == "models=*"
    assert (
        KeyPolicy(
            models=("a", "b"), rpm=5, max_tokens=9, clamp_max_tokens=True, enable_thinking=False, admin=True
        ).describe()
        == "models=a,b rpm=5 max_tokens=9 clamp enable_thinking=false admin"
    )


def test_set_policy_changes_every_active_secret_of_a_name_and_refuses_unknown_fields(tmp_path):
    store_ = KeyStore(tmp_path / "keys.sqlite", ttl_s=0)
    store_.create("alice", KeyPolicy(rpm=5))
    store_.rotate("alice", timedelta(hours=1))
    store_.create("bob", KeyPolicy(rpm=7))
    assert store_.set_policy("alice", rpm=60, models=("m",)) == KeyPolicy(rpm=60, models=("m",))
    assert [(k.name, k.policy.rpm, k.policy.models) for k in store_.list()] == [
        ("alice", 60, ("m",)),
        ("alice", 60, ("m",)),
        ("bob", 7, ("*",)),
    ]
    with pytest.raises(KeyError_, match=r"unknown policy fields.*'rpn'"):
        store_.set_policy("alice", rpn=1)
    with pytest.raises(KeyError_, match="no active key named 'carol'"):
        store_.set_policy("carol", rpm=1)


# --- expiry and rotation -----------------------------------------------------------------------------


def test_an_expired_key_stops_working_and_a_past_expiry_is_refused(tmp_path):
    store_ = KeyStore(tmp_path / "keys.sqlite", ttl_s=0)
    with pytest.raises(KeyError_, match="in the past"):
        store_.create("old", expires_at=datetime.now(UTC) - timedelta(minutes=1))
    soon = datetime.now(UTC) + timedelta(seconds=1)
    key = store_.create("alice", expires_at=soon)
    assert store_.lookup(key) == "alice"
    time.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.2)
    assert store_.lookup(key) is None
    assert store_.list()[0].state().startswith("expired ")
    store_.create("alice")  # an expired name is free again


def test_a_cached_key_stops_at_its_expiry_even_inside_the_ttl(tmp_path, clock):
    admin = KeyStore(tmp_path / "keys.sqlite")
    key = admin.create("alice", expires_at=datetime.now(UTC) + timedelta(hours=1))
    worker = KeyStore(tmp_path / "keys.sqlite", ttl_s=3600)
    assert worker.lookup(key) == "alice"
    clock.wall += 2 * 3600  # wall time passes the expiry; the copy is still fresh
    assert worker.lookup(key) is None


def test_an_expiry_in_another_time_zone_is_the_same_instant(tmp_path):
    store_ = KeyStore(tmp_path / "keys.sqlite")
    when = datetime(2031, 1, 31, 18, 0, tzinfo=timezone(timedelta(hours=5)))
    store_.create("alice", expires_at=when)
    stored = store_.list()[0].expires_at
    assert stored is not None
    assert stored.replace(tzinfo=stored.tzinfo or UTC) == when  # 13:00 UTC


def test_key_info_state_reads_active_expires_expired_or_revoked():
    now = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
    created = now - timedelta(days=1)
    assert KeyInfo("a", "1", created, None).state(now) == "active"
    assert (
        KeyInfo("a", "1", created, None, now + timedelta(hours=1)).state(now)
        == "expires 2030-06-01 13:00 UTC"
    )
    assert (
        KeyInfo("a", "1", created, None, now - timedelta(hours=1)).state(now)
        == "expired 2030-06-01 11:00 UTC"
    )
    naive = datetime(2030, 6, 1, 13, 0)  # SQLite gives naive datetimes back; they are UTC
    assert KeyInfo("a", "1", created, None, naive).state(now) == "expires 2030-06-01 13:00 UTC"
    assert KeyInfo("a", "1", created, now, now + timedelta(hours=1)).state(now) == "revoked 2030-06-01 12:00"


def test_rotation_keeps_both_secrets_for_the_grace_then_only_the_new_one(tmp_path):
    store_ = KeyStore(tmp_path / "keys.sqlite", ttl_s=0)
    policy = KeyPolicy(models=("m",), rpm=5)
    old = store_.create("alice", policy)
    new = store_.rotate("alice", timedelta(seconds=1))
    assert new != old
    assert store_.lookup(old) == "alice" and store_.lookup(new) == "alice"
    listed = store_.list()
    assert [(k.name, k.policy) for k in listed] == [("alice", policy), ("alice", policy)]
    assert listed[0].expires_at is not None and listed[1].expires_at is None
    with pytest.raises(KeyError_, match="already exists"):
        store_.create("alice")  # the name is taken while either secret works
    deadline = time.monotonic() + 10
    while store_.lookup(old) is not None:
        assert time.monotonic() < deadline, "the old secret still worked 10 s after a 1 s grace"
        time.sleep(0.1)
    assert store_.lookup(new) == "alice"
    with pytest.raises(KeyError_, match="no active key named 'carol' to rotate"):
        store_.rotate("carol")


def test_rotation_keeps_the_names_own_expiry_and_never_extends_the_old_secret(tmp_path):
    store_ = KeyStore(tmp_path / "keys.sqlite", ttl_s=0)
    before = datetime.now(UTC)
    month = before + timedelta(days=30)
    store_.create("long", expires_at=month)
    store_.rotate("long", timedelta(hours=1))
    old, new = (k.expires_at for k in store_.list())
    assert old is not None and new is not None
    assert timedelta(hours=1) <= old.replace(tzinfo=UTC) - before < timedelta(hours=1, minutes=1)
    assert new.replace(tzinfo=UTC) == month.replace(tzinfo=UTC)
    hour = before + timedelta(hours=1)
    store_.create("short", expires_at=hour)
    store_.rotate("short", timedelta(days=1))  # a grace past the name's expiry does not extend it
    assert [k.expires_at.replace(tzinfo=UTC) for k in store_.list()[2:] if k.expires_at] == [hour, hour]


def test_revoking_a_rotated_name_revokes_both_secrets(tmp_path):
    store_ = KeyStore(tmp_path / "keys.sqlite", ttl_s=0)
    old = store_.create("alice")
    new = store_.rotate("alice", timedelta(hours=1))
    store_.revoke("alice")
    assert store_.lookup(old) is None and store_.lookup(new) is None


def test_keys_work_the_same_on_postgres(postgres_url):
    store_ = KeyStore(postgres_url, ttl_s=0)
    name = f"pg-{uuid.uuid4().hex[:8]}"  # the server is shared by the whole test session
    old = store_.create(name, KeyPolicy(models=("m",), budget_day=10))
    new = store_.rotate(name, timedelta(hours=1))
    assert store_.lookup(old) == name and store_.lookup(new) == name
    assert store_.set_policy(name, rpm=3) == KeyPolicy(models=("m",), budget_day=10, rpm=3)
    mine = [k for k in store_.list() if k.name == name]
    assert [k.policy.rpm for k in mine] == [3, 3]
    assert mine[0].expires_at is not None and mine[0].expires_at.tzinfo is not None
    store_.revoke(name)
    assert store_.lookup(old) is None and store_.lookup(new) is None


# --- the CLI -----------------------------------------------------------------------------------------


@pytest.fixture
def keys_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The key database the CLI uses in this test (``KIT_GATEWAY_KEYS_DB``)."""
    path = tmp_path / "keys.sqlite"
    monkeypatch.setenv("KIT_GATEWAY_KEYS_DB", str(path))
    return path


def _created_key(out: str) -> str:
    key = out.strip().splitlines()[-1]
    assert key.startswith("sk-kit-"), out
    return key


def _listing(capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """``kit key list`` lines by key id."""
    assert kit(["key", "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return {line.split()[1][7:15]: line for line in lines} if lines else {}


def test_key_cli_create_list_revoke(keys_db, capsys):
    assert kit(["key", "create", "alice"]) == 0
    key = _created_key(capsys.readouterr().out)
    listing = _listing(capsys)
    line = listing[key[7:15]]
    assert "alice" in line and "active" in line and "models=*" in line and key not in line
    assert kit(["key", "create", "alice"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert kit(["key", "revoke", "alice"]) == 0
    assert KeyStore(keys_db).lookup(key) is None


def test_key_cli_create_with_a_policy_and_an_expiry_shows_both_in_the_list(keys_db, capsys):
    before = datetime.now(UTC)
    argv = ["key", "create", "alice", "--models", "a,b", "--rpm", "5", "--tpm", "100", "--budget-day", "1000"]
    assert kit([*argv, "--expires", "30d"]) == 0
    after = datetime.now(UTC)
    out = capsys.readouterr().out
    key = _created_key(out)
    assert "models=a,b rpm=5 tpm=100 budget_day=1000" in out and "expires" in out
    (info,) = KeyStore(keys_db).list()
    assert info.policy == KeyPolicy(models=("a", "b"), rpm=5, tpm=100, budget_day=1000)
    assert info.expires_at is not None
    expires = info.expires_at.replace(tzinfo=UTC)
    assert before + timedelta(days=30) <= expires <= after + timedelta(days=30)
    line = _listing(capsys)[key[7:15]]
    assert "models=a,b rpm=5 tpm=100 budget_day=1000" in line
    assert f"expires {expires:%Y-%m-%d %H:%M} UTC" in line


def test_key_cli_rotate_leaves_both_secrets_working_and_lists_the_old_ones_expiry(keys_db, capsys):
    assert kit(["key", "create", "alice", "--rpm", "5"]) == 0
    old = _created_key(capsys.readouterr().out)
    before = datetime.now(UTC)
    assert kit(["key", "rotate", "alice", "--grace", "1m"]) == 0
    after = datetime.now(UTC)
    out = capsys.readouterr().out
    new = _created_key(out)
    assert "keeps working until" in out
    store_ = KeyStore(keys_db, ttl_s=0)
    assert store_.lookup(old) == "alice" and store_.lookup(new) == "alice"
    old_info, new_info = store_.list()
    assert old_info.expires_at is not None and new_info.expires_at is None
    old_expiry = old_info.expires_at.replace(tzinfo=UTC)
    assert before + timedelta(minutes=1) <= old_expiry <= after + timedelta(minutes=1)
    assert new_info.policy == KeyPolicy(rpm=5)
    listing = _listing(capsys)
    assert f"expires {old_expiry:%Y-%m-%d %H:%M} UTC" in listing[old[7:15]]
    assert "active" in listing[new[7:15]] and "rpm=5" in listing[new[7:15]]


def test_key_cli_set_changes_a_policy(keys_db, capsys):
    assert kit(["key", "create", "alice"]) == 0
    key = _created_key(capsys.readouterr().out)
    argv = ["key", "set", "alice", "--rpm", "60", "--models", "m,team-*", "--max-tokens", "100", "--clamp"]
    assert kit([*argv, "--thinking", "off", "--admin"]) == 0
    assert "rpm=60" in capsys.readouterr().out
    expected = KeyPolicy(
        models=("m", "team-*"),
        rpm=60,
        max_tokens=100,
        clamp_max_tokens=True,
        enable_thinking=False,
        admin=True,
    )
    assert KeyStore(keys_db).list()[0].policy == expected
    assert (
        "models=m,team-* rpm=60 max_tokens=100 clamp enable_thinking=false admin"
        in _listing(capsys)[key[7:15]]
    )
    assert kit(["key", "set", "alice", "--tpm", "10"]) == 0  # unset flags change nothing
    assert KeyStore(keys_db).list()[0].policy == dataclasses.replace(expected, tpm=10)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["key", "create", "a", "--expires", "30x"], "expiry '30x'"),
        (["key", "create", "a", "--expires", "2027-13-45"], "expiry '2027-13-45'"),
        (["key", "create", "a", "--expires", "2020-01-01"], "in the past"),
        (["key", "create", "a", "--expires", "0d"], "in the past"),
        (["key", "create", "a", "--models", " , "], "--models is empty"),
        (["key", "create"], "say which key"),
        (["key", "rotate", "alice", "--grace", "soon"], "duration 'soon'"),
        (["key", "rotate", "alice", "--grace", "1y"], "duration '1y'"),
        (["key", "rotate", "carol"], "no active key named 'carol'"),
        (["key", "set", "alice"], "nothing to change"),
        (["key", "set", "carol", "--rpm", "1"], "no active key named 'carol'"),
    ],
)
def test_key_cli_mistakes_are_clear_errors_with_exit_1(keys_db, capsys, argv, message):
    KeyStore(keys_db).create("alice")
    assert kit(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert [k.name for k in KeyStore(keys_db).list()] == ["alice"]


@pytest.mark.parametrize(
    "argv",
    [
        ["key", "create", "a", "--expires", "99999999999d"],
        ["key", "create", "a", "--expires", "999999999d"],
        ["key", "rotate", "alice", "--grace", "999999999d"],
    ],
)
def test_key_cli_durations_too_large_are_clear_errors(keys_db, capsys, argv):
    KeyStore(keys_db).create("alice")
    assert kit(argv) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_key_cli_limits_must_be_whole_numbers_of_at_least_one(keys_db, capsys):
    with pytest.raises(SystemExit) as exited:
        kit(["key", "create", "a", "--rpm", "0"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "'0' is not a whole number >= 1" in err and "Traceback" not in err
