"""``GET /v1/usage``: the calling key's usage per model and UTC day; an admin key sees every key.

Query parameters: ``days`` (1-366, default 30) and, for admin keys, ``key`` (one key name).
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import parse_qs

from starlette.types import Scope, Send

from serve.gateway.errors import GatewayError, send_error
from serve.gateway.proxy import Call, Gateway, authenticate, presented_key
from serve.gateway.usage_report import totals, usage_rows


async def serve_usage(gateway: Gateway, call: Call, scope: Scope, send: Send) -> None:
    """Answer ``GET /v1/usage`` for the key on the request (401 without one, 403 for another key's usage
    asked by a non-admin, 400 for bad parameters)."""
    try:
        call.principal = principal = await authenticate(gateway, presented_key(scope))
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        days_text = query.get("days", ["30"])[-1]
        if not days_text.isdigit() or not 1 <= int(days_text) <= 366:
            raise GatewayError(
                400, f"days={days_text!r}: give a whole number of days from 1 to 366.", param="days"
            )
        key = query.get("key", [None])[-1]
        if not principal.policy.admin:
            if key not in (None, principal.name):
                raise GatewayError(
                    403,
                    f"Key {principal.name!r} may only read its own usage (an admin key reads everyone's).",
                    "permission_error",
                    "not_admin",
                    "key",
                )
            key = principal.name
        rows = await asyncio.to_thread(usage_rows, gateway.engine, key=key, days=int(days_text))
    except GatewayError as error:
        call.status = error.status
        await send_error(send, "openai", error)
        return
    body = json.dumps({"object": "list", "data": rows, "totals": totals(rows)}).encode()
    call.status = 200
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
