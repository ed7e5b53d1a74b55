"""API keys: created once and shown once, stored only as SHA-256 hashes in SQLite.

A key reads ``sk-kit-<key_id>_<secret>``: the 8-hex-digit ``key_id`` is a public handle used to find the
row, and the whole key's hash is then compared with ``hmac.compare_digest`` (constant time), so timing
says nothing about stored hashes. The secret holds 256 random bits, so a plain SHA-256 is enough (no
password-style slow hash: there is nothing to brute-force). Each gateway worker keeps the active
hashes in memory and reloads them at most every ``ttl_s`` seconds, so the hot path does no database
I/O and a revocation takes effect within ``ttl_s``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import DateTime, Index, String, create_engine, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

KEY_PREFIX = "sk-kit-"
_ID_HEX = 8  # length of the public key_id


class _Base(DeclarativeBase):
    pass


class ApiKey(_Base):
    """One row per key ever created; revoked keys stay for the record."""

    __tablename__ = "api_keys"
    # A name identifies one active key; a revoked key's name can be given to a new key.
    __table_args__ = (
        Index("uq_api_keys_active_name", "name", unique=True, sqlite_where=text("revoked_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    key_id: Mapped[str] = mapped_column(String(_ID_HEX), unique=True, index=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


@dataclass(frozen=True)
class KeyInfo:
    """A key as listed: never the key itself."""

    name: str
    key_id: str
    created_at: datetime
    revoked_at: datetime | None


class KeyError_(Exception):
    """A key operation failed for a reason the user can fix (the message says how)."""


def hash_key(key: str) -> str:
    """Hex SHA-256 of a plaintext key."""
    return hashlib.sha256(key.encode()).hexdigest()


def _valid_name(name: str) -> bool:
    return 0 < len(name) <= 64 and all(c.isalnum() or c in "-_." for c in name)


class KeyStore:
    """Create, list, revoke and check API keys in one SQLite file.

    Args:
        path: the SQLite file; created (mode 0600, parent folders too) on first use.
        ttl_s: seconds a cached set of active keys is trusted by ``lookup``.
    """

    def __init__(self, path: Path, ttl_s: float = 2.0) -> None:
        self.path = path
        self.ttl_s = ttl_s
        self._engine: Engine | None = None
        self._active: dict[str, tuple[str, str]] = {}
        self._loaded_at = float("-inf")

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.exists()
            self._engine = create_engine(f"sqlite:///{self.path}")
            _Base.metadata.create_all(self._engine)
            if fresh:
                os.chmod(self.path, 0o600)
        return self._engine

    def create(self, name: str) -> str:
        """Create a key called ``name`` and return its plaintext, the only time it is ever available.

        Raises:
            KeyError_: the name is invalid or already used.
        """
        if not _valid_name(name):
            raise KeyError_(f"invalid key name {name!r}: use 1-64 letters, digits, '-', '_' or '.'")
        key_id = secrets.token_hex(_ID_HEX // 2)
        key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        row = ApiKey(name=name, key_id=key_id, key_hash=hash_key(key), created_at=datetime.now(UTC))
        try:
            with Session(self.engine) as session, session.begin():
                session.add(row)
        except IntegrityError:
            raise KeyError_(
                f"an active key named {name!r} already exists: pick another name, or revoke it "
                f"first (make key-revoke NAME={name})"
            ) from None
        self._loaded_at = float("-inf")
        return key

    def list(self) -> list[KeyInfo]:
        """All keys, oldest first, revoked ones included."""
        with Session(self.engine) as session:
            rows = session.scalars(select(ApiKey).order_by(ApiKey.id)).all()
            return [KeyInfo(r.name, r.key_id, r.created_at, r.revoked_at) for r in rows]

    def revoke(self, name: str) -> None:
        """Revoke the key called ``name``.

        Raises:
            KeyError_: no active key has that name.
        """
        with Session(self.engine) as session, session.begin():
            row = session.scalars(
                select(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None))
            ).one_or_none()
            if row is None:
                raise KeyError_(f"no active key named {name!r} (make key-list shows the keys)")
            row.revoked_at = datetime.now(UTC)
        self._loaded_at = float("-inf")

    def lookup(self, presented: str) -> str | None:
        """The name of the active key ``presented``, or None (malformed, unknown or revoked)."""
        if not presented.startswith(KEY_PREFIX):
            return None
        key_id = presented[len(KEY_PREFIX) : len(KEY_PREFIX) + _ID_HEX]
        now = time.monotonic()
        if now - self._loaded_at > self.ttl_s:
            with Session(self.engine) as session:
                rows = session.execute(
                    select(ApiKey.key_id, ApiKey.key_hash, ApiKey.name).where(ApiKey.revoked_at.is_(None))
                )
                self._active = {kid: (digest, name) for kid, digest, name in rows}
            self._loaded_at = now
        entry = self._active.get(key_id)
        if entry is None:
            return None
        stored, name = entry
        return name if hmac.compare_digest(stored, hash_key(presented)) else None
