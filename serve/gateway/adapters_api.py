"""Runtime LoRA adapters, for admin keys: ``POST /v1/adapters/load`` and ``POST /v1/adapters/unload`` with
``{"name": "<adapter>"}``.

Only a plain name is accepted (letters, digits, ``.``, ``_``, ``-``; no path, no ``..``), and only a
folder of that name directly under the configured ``adapters_dir``. Before vLLM sees it, the adapter
passes the same checks as at ``kit up`` (``serve.adapters.check_adapter``: peft LoRA, rank within the
profile's ``max_lora_rank``, trained on the served base, every module naming a base weight); after
vLLM's ``/v1/load_lora_adapter`` answers, the gateway checks that ``/v1/models`` lists the adapter,
so a load that vLLM accepted but did not apply is an error, never a silent success. A name equal to a
served model or an alias is refused: requests for it would reach another model than the caller meant.

vLLM exposes its load/unload routes only with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and LoRA on
(vLLM docs, "LoRA Adapters: Dynamically serving LoRA Adapters"); ``kit up`` sets both when the profile
names an ``adapters_dir``. The adapter then appears in ``/v1/models`` for the keys whose models allow it.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
from starlette.types import Receive, Scope, Send

from serve.adapters import check_adapter
from serve.gateway.errors import GatewayError, send_error
from serve.gateway.proxy import (
    Call,
    ClientGone,
    Gateway,
    authenticate,
    declared_length,
    presented_key,
    read_body,
)

LOAD_PATH = "/v1/adapters/load"
UNLOAD_PATH = "/v1/adapters/unload"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_BODY_BYTES = 4096


def _bad(message: str, code: str, status: int = 400) -> GatewayError:
    return GatewayError(status, message, "invalid_request_error", code, "name")


def adapter_folder(adapters_dir: Path, name: Any) -> Path:
    """The folder of adapter ``name`` under ``adapters_dir``.

    Raises:
        GatewayError: 400 for anything but a plain name (a path, ``..``, an empty or odd name).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise _bad(
            f"name {name!r} is not an adapter name: give the name of a folder in the adapters directory "
            "(letters, digits, '.', '_', '-'; no paths).",
            "invalid_adapter_name",
        )
    root = adapters_dir.resolve()
    folder = (root / name).resolve()
    if folder.parent != root:  # a symlink out of the adapters directory
        raise _bad(
            f"adapter {name!r} does not resolve to a folder in the adapters directory.",
            "invalid_adapter_name",
        )
    return folder


async def _upstream(gateway: Gateway, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
    assert gateway.session is not None
    try:
        async with gateway.session.request(
            method, gateway.upstream_base + path, json=payload, headers=gateway.upstream_headers
        ) as reply:
            text = await reply.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise GatewayError(
            503, f"The model server is not reachable ({exc.__class__.__name__}).", "service_unavailable"
        ) from None
    try:
        return reply.status, json.loads(text)
    except ValueError:
        return reply.status, text


async def _listed(gateway: Gateway, name: str) -> bool:
    status, listing = await _upstream(gateway, "GET", "/v1/models")
    models = listing.get("data") if status == 200 and isinstance(listing, dict) else None
    return isinstance(models, list) and any(isinstance(m, dict) and m.get("id") == name for m in models)


async def _load(gateway: Gateway, name: str, folder: Path) -> dict[str, Any]:
    settings = gateway.settings
    if not folder.is_dir():
        raise _bad(f"no adapter folder {name!r} in the adapters directory.", "adapter_not_found", 404)
    if settings.base_model_dir is None or not settings.served_model_names:
        raise GatewayError(
            500, "the gateway does not know the served base (base_model_dir, served_model_names)", "api_error"
        )
    report = await asyncio.to_thread(
        check_adapter, folder, settings.base_model_dir, settings.served_model_names[0], settings.max_lora_rank
    )
    if report.problems:
        raise _bad(
            f"adapter {name!r} cannot be served: " + "; ".join(report.problems), "adapter_check_failed"
        )
    status, answer = await _upstream(
        gateway, "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)}
    )
    if status != 200:
        raise GatewayError(
            502, f"vLLM refused to load adapter {name!r}: {answer}", "api_error", "upstream_refused"
        )
    if not await _listed(gateway, name):
        raise GatewayError(
            502,
            f"vLLM accepted adapter {name!r} but does not list it in /v1/models.",
            "api_error",
            "not_listed",
        )
    return {"object": "adapter", "id": name, "loaded": True, "checks": report.passed, "notes": report.notes}


async def _unload(gateway: Gateway, name: str) -> dict[str, Any]:
    status, answer = await _upstream(gateway, "POST", "/v1/unload_lora_adapter", {"lora_name": name})
    if status != 200:
        raise _bad(f"vLLM could not unload adapter {name!r}: {answer}", "adapter_not_loaded", 404)
    if await _listed(gateway, name):
        raise GatewayError(
            502, f"vLLM still lists adapter {name!r} after unloading it.", "api_error", "still_listed"
        )
    return {"object": "adapter", "id": name, "loaded": False}


async def serve_adapters(gateway: Gateway, call: Call, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer a load or unload request (401 without a key, 403 for a non-admin key, 404 when runtime
    adapters are off or the folder is missing, 400 for a bad name or failed checks, 409 for a name
    that is a served model or alias, 502 when vLLM refuses or does not apply it)."""
    try:
        call.principal = principal = await authenticate(gateway, presented_key(scope))
        if not principal.policy.admin:
            raise GatewayError(
                403,
                f"Key {principal.name!r} may not load or unload adapters (admin keys only).",
                "permission_error",
                "not_admin",
            )
        settings = gateway.settings
        if settings.adapters_dir is None:
            raise GatewayError(
                404,
                "Runtime adapters are off: set adapters_dir in the gateway settings.",
                code="adapters_off",
            )
        try:
            obj = json.loads(await read_body(receive, _MAX_BODY_BYTES, declared_length(scope)) or b"null")
        except ValueError:
            obj = None
        name = obj.get("name") if isinstance(obj, dict) else None
        folder = adapter_folder(settings.adapters_dir, name)
        assert isinstance(name, str)
        if name in settings.served_model_names or gateway.aliases.resolve(name) is not None:
            raise _bad(
                f"{name!r} is a served model or an alias: name the adapter's folder something else.",
                "name_taken",
                409,
            )
        call.model = name
        result = await (
            _load(gateway, name, folder) if call.route.path == LOAD_PATH else _unload(gateway, name)
        )
    except GatewayError as error:
        call.status = error.status
        await send_error(send, "openai", error)
        return
    except ClientGone:
        call.status = 499
        return
    body = json.dumps(result).encode()
    call.status = 200
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
