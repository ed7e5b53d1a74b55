"""API keys: shown once, stored hashed, revocable, checked by key id + constant-time comparison."""

from __future__ import annotations

import stat

import pytest

from serve.cli import main as kit
from serve.gateway.keys import KeyError_, KeyStore


def test_keys_are_stored_only_as_hashes_in_a_private_file(tmp_path):
    store = KeyStore(tmp_path / "state" / "keys.sqlite")
    key = store.create("alice")
    raw = (tmp_path / "state" / "keys.sqlite").read_bytes()
    secret = key.split("_", 1)[1]
    assert secret.encode() not in raw and key.encode() not in raw
    assert stat.S_IMODE((tmp_path / "state" / "keys.sqlite").stat().st_mode) == 0o600
    assert store.lookup(key) == "alice"


def test_wrong_malformed_and_revoked_keys_are_rejected(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite", ttl_s=0)
    key = store.create("alice")
    other = store.create("bob")
    assert store.lookup(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.lookup(key.replace("sk-kit-", "sk-")) is None
    assert store.lookup("") is None
    assert store.lookup(other) == "bob"
    store.revoke("alice")
    assert store.lookup(key) is None
    assert store.lookup(other) == "bob"
    assert [(k.name, k.revoked_at is not None) for k in store.list()] == [("alice", True), ("bob", False)]


def test_a_revocation_reaches_another_worker_within_the_ttl(tmp_path):
    admin = KeyStore(tmp_path / "keys.sqlite")
    key = admin.create("alice")
    worker = KeyStore(tmp_path / "keys.sqlite", ttl_s=0)
    assert worker.lookup(key) == "alice"
    admin.revoke("alice")
    assert worker.lookup(key) is None


def test_duplicate_and_invalid_names_and_unknown_revokes_are_clear_errors(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite")
    store.create("alice")
    with pytest.raises(KeyError_, match="already exists"):
        store.create("alice")
    with pytest.raises(KeyError_, match="invalid key name"):
        store.create("no spaces")
    with pytest.raises(KeyError_, match="no active key"):
        store.revoke("carol")


def test_a_revoked_name_can_be_reused_and_only_the_new_key_works(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite", ttl_s=0)
    old = store.create("alice")
    store.revoke("alice")
    with pytest.raises(KeyError_, match="no active key"):
        store.revoke("alice")
    new = store.create("alice")
    assert store.lookup(new) == "alice"
    assert store.lookup(old) is None
    assert [(k.name, k.revoked_at is None) for k in store.list()] == [("alice", False), ("alice", True)]


def test_key_cli_create_list_revoke(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KIT_GATEWAY_KEYS_DB", str(tmp_path / "keys.sqlite"))
    assert kit(["key", "create", "alice"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert key.startswith("sk-kit-")
    assert kit(["key", "list"]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and "active" in listing and key not in listing
    assert kit(["key", "create", "alice"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert kit(["key", "revoke", "alice"]) == 0
    assert KeyStore(tmp_path / "keys.sqlite").lookup(key) is None
