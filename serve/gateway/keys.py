"""API keys: created once and shown once, stored only as SHA-256 hashes, each carrying its policy.

A key reads ``sk-kit-<key_id>_<secret>``: the 8-hex-digit ``key_id`` is a public handle used to find the
row, and the whole key's hash is then compared with ``hmac.compare_digest`` (constant time), so timing
says nothing about stored hashes. The secret holds 256 random bits, so a plain SHA-256 is enough (no
password-style slow hash: there is nothing to brute-force).

Each gateway worker keeps the active keys in memory (``KeyCache``) and reloads them, in a thread, at most
every ``ttl_s`` seconds: the hot path does no database I/O on the event loop, and a revocation, an expiry
or a policy change takes effect within ``ttl_s``.

Several active keys may share a name: ``rotate`` issues a new secret for a name and lets the old one run
until a given time. Limits and budgets count per name, so a rotation keeps them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import functools
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from serve.gateway.store import ApiKey, open_engine, reader

logger = logging.getLogger(__name__)

KEY_PREFIX = "sk-kit-"
_ID_HEX = 8  # length of the public key_id


@dataclass(frozen=True)
class KeyPolicy:
    """What a key may do. ``None`` is "no limit"; token counts are prompt + completion tokens.

    Attributes:
        models: served model ids and adapter names the key may call; shell-style globs (``*``,
            ``team-*``).
        rpm: requests per minute (fixed one-minute windows, UTC).
        tpm: tokens per minute; a request reserves its prompt estimate + ``max_tokens`` when admitted and
            is settled to its real usage when it ends.
        max_concurrent: requests of this key in flight at once, across workers and hosts.
        budget_day / budget_month: tokens per UTC day / calendar month, reserved and settled like ``tpm``.
        max_tokens: cap on ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens``; a
            request above it gets 400, or is lowered to it when ``clamp_max_tokens`` is set. A request
            that sets none is given the cap.
        max_n: cap on ``n`` (choices per request).
        enable_thinking: default for ``chat_template_kwargs.enable_thinking`` when a chat completion does
            not set it, and for Anthropic ``thinking`` (None: the model's default).
        thinking_budget: most reasoning tokens per request (vLLM's ``thinking_token_budget``: at the
            budget the model is made to end its reasoning and answer; see ``serve/gateway/thinking.py``).
        admin: may read everyone's usage.
        system_policy: id of a policy in the gateway's ``system_policies`` whose system message the
            gateway adds to this key's chat, messages and responses requests (see
            ``serve/gateway/system_policy.py``); None: the model's policy, if any.
    """

    models: tuple[str, ...] = ("*",)
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    budget_day: int | None = None
    budget_month: int | None = None
    max_tokens: int | None = None
    clamp_max_tokens: bool = False
    max_n: int | None = None
    enable_thinking: bool | None = None
    thinking_budget: int | None = None
    admin: bool = False
    system_policy: str | None = None

    def allows(self, model: str) -> bool:
        """Whether ``model`` matches one of ``models``."""
        return "*" in self.models or any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    @functools.cached_property
    def limited(self) -> bool:
        """Whether admission must consult the shared counters at all (worked out once per policy)."""
        return any(
            v is not None
            for v in (self.rpm, self.tpm, self.max_concurrent, self.budget_day, self.budget_month)
        )

    @functools.cached_property
    def counts_tokens(self) -> bool:
        """Whether the key has a token limit (``tpm`` or a budget), so requests reserve tokens."""
        return self.tpm is not None or self.budget_day is not None or self.budget_month is not None

    def describe(self) -> str:
        """One line for ``make key-list``: only what is set."""
        parts = [f"models={','.join(self.models)}"]
        for name in ("rpm", "tpm", "max_concurrent", "budget_day", "budget_month", "max_tokens", "max_n"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value}")
        if self.clamp_max_tokens:
            parts.append("clamp")
        if self.enable_thinking is not None:
            parts.append(f"enable_thinking={str(self.enable_thinking).lower()}")
        if self.thinking_budget is not None:
            parts.append(f"thinking_budget={self.thinking_budget}")
        if self.admin:
            parts.append("admin")
        if self.system_policy is not None:
            parts.append(f"system_policy={self.system_policy}")
        return " ".join(parts)


_POLICY_FIELDS = tuple(f.name for f in dataclasses.fields(KeyPolicy))


def _policy_of(row: ApiKey) -> KeyPolicy:
    values = {name: getattr(row, name) for name in _POLICY_FIELDS}
    values["models"] = tuple(row.models or ("*",))
    values["clamp_max_tokens"] = bool(row.clamp_max_tokens)
    values["admin"] = bool(row.admin)
    return KeyPolicy(**values)


@dataclass(frozen=True)
class Principal:
    """The caller a valid key identifies."""

    name: str
    key_id: str
    policy: KeyPolicy


@dataclass(frozen=True)
class KeyInfo:
    """A key as listed: never the key itself."""

    name: str
    key_id: str
    created_at: datetime
    revoked_at: datetime | None
    expires_at: datetime | None = None
    policy: KeyPolicy = field(default_factory=KeyPolicy)

    def state(self, now: datetime | None = None) -> str:
        """``active``, ``expires <time>``, ``expired <time>`` or ``revoked <time>``."""
        now = now or datetime.now(UTC)
        if self.revoked_at is not None:
            return f"revoked {self.revoked_at:%Y-%m-%d %H:%M}"
        if self.expires_at is not None:
            expires = _aware(self.expires_at)
            word = "expired" if expires <= now else "expires"
            return f"{word} {expires:%Y-%m-%d %H:%M} UTC"
        return "active"


class KeyError_(Exception):
    """A key operation failed for a reason the user can fix (the message says how)."""


def hash_key(key: str) -> str:
    """Hex SHA-256 of a plaintext key."""
    return hashlib.sha256(key.encode()).hexdigest()


def _valid_name(name: str) -> bool:
    return 0 < len(name) <= 64 and all(c.isalnum() or c in "-_." for c in name)


def _aware(value: datetime) -> datetime:
    """SQLite returns naive datetimes for timezone-aware columns; every stored time is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _new_key(name: str, policy: KeyPolicy, expires_at: datetime | None, now: datetime) -> tuple[ApiKey, str]:
    """A new key's row and its plaintext (256 random bits after the public key id)."""
    key_id = secrets.token_hex(_ID_HEX // 2)
    key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    values = dataclasses.asdict(policy)
    values["models"] = list(values["models"])
    row = ApiKey(
        name=name, key_id=key_id, key_hash=hash_key(key), created_at=now, expires_at=expires_at, **values
    )
    return row, key


def _is_usable(row: ApiKey, now: datetime) -> bool:
    return row.revoked_at is None and (row.expires_at is None or _aware(row.expires_at) > now)


class KeyStore:
    """Create, list, rotate, revoke and check API keys.

    Args:
        database: a SQLite file path, or a SQLAlchemy URL (``postgresql+psycopg://...``).
        ttl_s: seconds a loaded set of active keys is trusted by ``lookup``.
        create: make a missing SQLite file (the CLI does; the gateway refuses to start without one).
    """

    def __init__(self, database: Path | str, ttl_s: float = 2.0, *, create: bool = True) -> None:
        self.url = f"sqlite:///{database}" if isinstance(database, Path) else database
        self.ttl_s = ttl_s
        self._create = create
        self._engine: Engine | None = None
        self._active: dict[str, tuple[str, Principal, float]] = {}
        self._loaded_at = float("-inf")

    @property
    def engine(self) -> Engine:
        """The opened engine (tables created on first use)."""
        if self._engine is None:
            self._engine = open_engine(self.url, create=self._create)
        return self._engine

    def _active_rows(self, session: Session, name: str, now: datetime) -> list[ApiKey]:
        rows = session.scalars(select(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None))).all()
        return [r for r in rows if _is_usable(r, now)]

    def _existing_rows(self, session: Session, name: str, now: datetime, doing: str = "") -> list[ApiKey]:
        """The active rows of ``name``; raises ``KeyError_`` when there are none."""
        rows = self._active_rows(session, name, now)
        if not rows:
            raise KeyError_(f"no active key named {name!r}{doing} (make key-list shows the keys)")
        return rows

    def create(self, name: str, policy: KeyPolicy | None = None, expires_at: datetime | None = None) -> str:
        """Create a key called ``name`` and return its plaintext, the only time it is ever available.

        Raises:
            KeyError_: the name is invalid or an active key already has it (rotate it instead).
        """
        if not _valid_name(name):
            raise KeyError_(f"invalid key name {name!r}: use 1-64 letters, digits, '-', '_' or '.'")
        now = datetime.now(UTC)
        if expires_at is not None:
            # Stored as UTC: SQLite keeps a datetime's wall clock only, not its offset.
            expires_at = _aware(expires_at).astimezone(UTC)
            if expires_at <= now:
                raise KeyError_(f"expiry {expires_at:%Y-%m-%d %H:%M} UTC is in the past")
        row, key = _new_key(name, policy or KeyPolicy(), expires_at, now)
        with Session(self.engine) as session, session.begin():
            if self._active_rows(session, name, now):
                raise KeyError_(
                    f"an active key named {name!r} already exists: pick another name, issue it a new "
                    f"secret with `make key-rotate NAME={name}`, or revoke it first "
                    f"(make key-revoke NAME={name})"
                )
            session.add(row)
        self._loaded_at = float("-inf")
        return key

    def rotate(self, name: str, grace: timedelta = timedelta(hours=1)) -> str:
        """Issue a new secret for ``name`` with the same policy; the old ones stay valid for ``grace``.

        Returns:
            The new plaintext key (shown once).

        Raises:
            KeyError_: no active key has that name.
        """
        now = datetime.now(UTC)
        with Session(self.engine) as session, session.begin():
            rows = self._existing_rows(session, name, now, " to rotate")
            newest = max(rows, key=lambda r: r.id)
            # The new secret keeps the name's policy and its own expiry, if it has one.
            new_row, key = _new_key(name, _policy_of(newest), newest.expires_at, now)
            until = now + grace
            for row in rows:
                if row.expires_at is None or _aware(row.expires_at) > until:
                    row.expires_at = until
            session.add(new_row)
        self._loaded_at = float("-inf")
        return key

    def list(self) -> list[KeyInfo]:
        """All keys, oldest first, revoked and expired ones included."""
        with Session(reader(self.engine)) as session:
            rows = session.scalars(select(ApiKey).order_by(ApiKey.id)).all()
            return [
                KeyInfo(r.name, r.key_id, r.created_at, r.revoked_at, r.expires_at, _policy_of(r))
                for r in rows
            ]

    def revoke(self, name: str) -> None:
        """Revoke every active key called ``name`` (old secrets of a rotation included).

        Raises:
            KeyError_: no active key has that name.
        """
        now = datetime.now(UTC)
        with Session(self.engine) as session, session.begin():
            rows = self._existing_rows(session, name, now)
            for row in rows:
                row.revoked_at = now
        self._loaded_at = float("-inf")

    def set_policy(self, name: str, **changes: Any) -> KeyPolicy:
        """Change policy fields of every active key called ``name``; returns the new policy.

        Raises:
            KeyError_: no active key has that name, or a field is unknown.
        """
        unknown = set(changes) - set(_POLICY_FIELDS)
        if unknown:
            raise KeyError_(f"unknown policy fields {sorted(unknown)}; known: {', '.join(_POLICY_FIELDS)}")
        if "models" in changes:
            changes["models"] = list(changes["models"])
        now = datetime.now(UTC)
        with Session(self.engine) as session, session.begin():
            rows = self._existing_rows(session, name, now)
            ids = [r.id for r in rows]
            session.execute(update(ApiKey).where(ApiKey.id.in_(ids)).values(**changes))
        self._loaded_at = float("-inf")
        with Session(reader(self.engine)) as session:
            return _policy_of(session.get_one(ApiKey, ids[0]))

    def load_active(self) -> dict[str, tuple[str, Principal, float]]:
        """Every usable key: ``key_id -> (hash, principal, expires_at epoch or inf)`` (blocking I/O)."""
        now = datetime.now(UTC)
        with Session(reader(self.engine)) as session:
            rows = session.scalars(
                select(ApiKey).where(
                    ApiKey.revoked_at.is_(None), or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > now)
                )
            ).all()
            return {
                r.key_id: (
                    r.key_hash,
                    Principal(r.name, r.key_id, _policy_of(r)),
                    _aware(r.expires_at).timestamp() if r.expires_at is not None else float("inf"),
                )
                for r in rows
            }

    def lookup(self, presented: str) -> str | None:
        """The name of the usable key ``presented``, or None (blocking; for the CLI and tests)."""
        if time.monotonic() - self._loaded_at > self.ttl_s:
            self._active = self.load_active()
            self._loaded_at = time.monotonic()
        principal = match(self._active, presented)
        return principal.name if principal else None


def match(active: dict[str, tuple[str, Principal, float]], presented: str) -> Principal | None:
    """The principal ``presented`` identifies in ``active`` (see ``KeyStore.load_active``), or None."""
    if not presented.startswith(KEY_PREFIX):
        return None
    entry = active.get(presented[len(KEY_PREFIX) : len(KEY_PREFIX) + _ID_HEX])
    if entry is None:
        return None
    stored, principal, expires_at = entry
    if expires_at <= time.time() or not hmac.compare_digest(stored, hash_key(presented)):
        return None
    return principal


class KeyCache:
    """The gateway worker's view of the active keys: ``await authenticate(key)`` never blocks the event
    loop; the database is read in a thread at most every ``store.ttl_s`` seconds, one read at a time, and
    requests go on with the copy loaded before while it reads (a key change takes effect within the TTL
    plus one read).

    Args:
        store: where the keys live.
    """

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self._active: dict[str, tuple[str, Principal, float]] = {}
        self._loaded_at = float("-inf")
        self._refresh: asyncio.Future[None] | None = None

    async def _reload(self) -> None:
        self._active = await asyncio.to_thread(self.store.load_active)
        self._loaded_at = time.monotonic()

    def fresh(self) -> bool:
        """Whether the loaded copy is within its TTL (then ``match(cache.active, key)`` needs no await)."""
        return time.monotonic() - self._loaded_at <= self.store.ttl_s

    @property
    def active(self) -> dict[str, tuple[str, Principal, float]]:
        """The loaded copy of the active keys (see ``KeyStore.load_active``)."""
        return self._active

    async def authenticate(self, presented: str) -> Principal | None:
        """The principal of ``presented`` or None (malformed, unknown, expired or revoked).

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the key database could not be read and no copy is loaded
                yet (the gateway answers 500 with its error envelope).
        """
        if time.monotonic() - self._loaded_at > self.store.ttl_s:
            if self._refresh is None or self._refresh.done():
                self._refresh = asyncio.ensure_future(self._reload())
                self._refresh.add_done_callback(_log_failure)
            if self._loaded_at == float("-inf"):
                await asyncio.shield(self._refresh)  # nothing loaded yet: wait (a failure answers 500)
            # Else the copy loaded before answers while the thread reads; a failed read keeps it.
        return match(self._active, presented)


def _log_failure(refresh: asyncio.Future[None]) -> None:
    if not refresh.cancelled() and refresh.exception() is not None:
        logger.warning("key database read failed; keeping the keys loaded before: %r", refresh.exception())
