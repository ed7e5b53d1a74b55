"""``kit key ...`` and ``kit usage``: API keys with their policy, and the usage ledger's table.

kit key create NAME [--models a,b*] [--rpm N] [--tpm N] [--max-concurrent N] [--budget-day N]
                    [--budget-month N] [--max-tokens N [--clamp]] [--max-n N] [--thinking on|off]
                    [--thinking-budget N] [--system-policy ID|none] [--admin]
                    [--expires 2027-01-31|30d|12h]
kit key set NAME [the same policy flags]      change the policy of a key name
kit key rotate NAME [--grace 1h]              new secret; the old one works for the grace period
kit key list | kit key revoke NAME
kit usage [--key NAME] [--days N]
"""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from serve.gateway.keys import KeyError_, KeyPolicy, KeyStore
from serve.gateway.settings import GatewaySettings
from serve.gateway.usage_report import render_table, usage_rows

_DURATION = re.compile(r"(\d+)\s*([mhdw])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_LIMIT_FLAGS = (
    "rpm",
    "tpm",
    "max_concurrent",
    "budget_day",
    "budget_month",
    "max_tokens",
    "max_n",
    "thinking_budget",
)


def parse_duration(text: str) -> timedelta:
    """``90m``, ``12h``, ``30d``, ``2w`` as a timedelta.

    Raises:
        KeyError_: anything else (the message shows the accepted forms).
    """
    found = _DURATION.fullmatch(text.strip())
    if not found:
        raise KeyError_(f"duration {text!r}: write a number and a unit, e.g. 90m, 12h, 30d or 2w")
    try:
        duration = timedelta(**{_UNITS[found.group(2)]: int(found.group(1))})
        datetime.now(UTC) + duration  # must stay a representable time
    except OverflowError:
        raise KeyError_(f"duration {text!r} is too long: give at most a few thousand years") from None
    return duration


def parse_expiry(text: str, now: datetime | None = None) -> datetime:
    """An expiry given as a duration from now (``30d``) or an ISO date/time (UTC unless it says).

    Raises:
        KeyError_: neither form.
    """
    now = now or datetime.now(UTC)
    if _DURATION.fullmatch(text.strip()):
        return now + parse_duration(text)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise KeyError_(
            f"expiry {text!r}: give a date (2027-01-31), a date and time (2027-01-31T18:00) or a duration "
            "from now (30d, 12h)"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def add_policy_flags(sub: argparse.ArgumentParser) -> None:
    """The policy flags shared by ``key create`` and ``key set`` (unset flags change nothing)."""
    sub.add_argument("--models", help="comma-separated model ids / adapter names the key may call (globs: *)")
    for name in _LIMIT_FLAGS:
        sub.add_argument("--" + name.replace("_", "-"), type=_positive, default=None, metavar="N")
    sub.add_argument("--clamp", action="store_true", default=None, help="lower max_tokens above the cap")
    sub.add_argument("--thinking", choices=["on", "off"], help="default enable_thinking for chat completions")
    sub.add_argument(
        "--system-policy",
        metavar="ID",
        help="a system_policies id from the gateway settings whose system message this key's requests get "
        "('none' removes it)",
    )
    sub.add_argument("--admin", action="store_true", default=None, help="may read everyone's usage")


def policy_changes(args: argparse.Namespace, settings: GatewaySettings | None = None) -> dict[str, Any]:
    """The policy fields the command line sets.

    Raises:
        KeyError_: an empty ``--models``, or a ``--system-policy`` the gateway ``settings`` do not define.
    """
    changes: dict[str, Any] = {n: getattr(args, n) for n in _LIMIT_FLAGS if getattr(args, n) is not None}
    if args.models is not None:
        models = tuple(m.strip() for m in args.models.split(",") if m.strip())
        if not models:
            raise KeyError_("--models is empty: name at least one model id or '*'")
        changes["models"] = models
    if args.clamp:
        changes["clamp_max_tokens"] = True
    if args.thinking is not None:
        changes["enable_thinking"] = args.thinking == "on"
    if args.admin:
        changes["admin"] = True
    if getattr(args, "system_policy", None) is not None:
        chosen = None if args.system_policy == "none" else args.system_policy
        defined = settings.system_policies if settings is not None else {}
        if chosen is not None and chosen not in defined:
            known = ", ".join(sorted(defined)) or "none is defined"
            raise KeyError_(
                f"--system-policy {chosen!r}: the gateway settings define no such policy ({known}); add it "
                "under system_policies in configs/gateway.yaml (or the KIT_GATEWAY_CONFIG file) first"
            )
        changes["system_policy"] = chosen
    return changes


def _store(settings: GatewaySettings) -> KeyStore:
    return KeyStore(settings.database)


def _require_name(args: argparse.Namespace, example: str) -> str:
    if not args.name:
        raise KeyError_(f"say which key: {example}")
    return str(args.name)


def cmd_key(args: argparse.Namespace, settings: GatewaySettings) -> int:
    """Create, list, change, rotate or revoke gateway API keys (stored hashed in the gateway database)."""
    store = _store(settings)
    if args.action == "create":
        name = _require_name(args, "make key NAME=alice")
        expires = parse_expiry(args.expires) if args.expires else None
        policy = KeyPolicy(**policy_changes(args, settings))
        key = store.create(name, policy, expires)
        until = f", expires {expires:%Y-%m-%d %H:%M} UTC" if expires else ""
        print(f"created key {name!r} ({policy.describe()}{until}); it is shown only this once:\n{key}")
    elif args.action == "list":
        for info in store.list():
            print(
                f"{info.name:20} sk-kit-{info.key_id}_…  created {info.created_at:%Y-%m-%d %H:%M}  "
                f"{info.state():28} {info.policy.describe()}"
            )
    elif args.action == "set":
        name = _require_name(args, "make key-set NAME=alice RPM=60")
        changes = policy_changes(args, settings)
        if not changes:
            raise KeyError_("nothing to change: give a policy flag, e.g. make key-set NAME=alice RPM=60")
        policy = store.set_policy(name, **changes)
        print(f"key {name!r} now: {policy.describe()} (workers pick it up within key_cache_ttl_s)")
    elif args.action == "rotate":
        name = _require_name(args, "make key-rotate NAME=alice")
        grace = parse_duration(args.grace)
        key = store.rotate(name, grace)
        print(
            f"new secret for {name!r}; the old one keeps working until "
            f"{datetime.now(UTC) + grace:%Y-%m-%d %H:%M} UTC. Shown only this once:\n{key}"
        )
    else:
        name = _require_name(args, "make key-revoke NAME=alice")
        store.revoke(name)
        print(f"revoked key {name!r}")
    return 0


def cmd_usage(args: argparse.Namespace, settings: GatewaySettings) -> int:
    """Print usage per UTC day, key and model from the ledger (reasoning tokens apart)."""
    if args.days < 1:
        raise KeyError_(f"--days {args.days}: give 1 or more")
    rows = usage_rows(_store(settings).engine, key=args.key, days=args.days)
    if not rows:
        who = f"key {args.key!r}" if args.key else "any key"
        print(f"no usage by {who} in the last {args.days} days")
        return 0
    print(render_table(rows))
    return 0


def add_key_arguments(sub: argparse.ArgumentParser) -> None:
    """Arguments of ``kit key``."""
    sub.add_argument("action", choices=["create", "list", "set", "rotate", "revoke"])
    sub.add_argument("name", nargs="?")
    add_policy_flags(sub)
    sub.add_argument("--expires", help="expiry: 2027-01-31, 2027-01-31T18:00 (UTC) or 30d / 12h from now")
    sub.add_argument("--grace", default="1h", help="rotate: how long the old secret keeps working (1h)")


def add_usage_arguments(sub: argparse.ArgumentParser) -> None:
    """Arguments of ``kit usage``."""
    sub.add_argument("--key", help="only this key name")
    sub.add_argument("--days", type=int, default=30, help="UTC days back, today included (30)")
