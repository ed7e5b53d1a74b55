"""What a key's policy does to a request before it goes upstream: which model it may call, caps on
``max_tokens`` and ``n``, thinking defaults, and the usage the gateway asks vLLM to report.

Pure functions on the request's decoded JSON object: they raise ``GatewayError`` (403, 400) or return
the fields to change; the caller re-encodes the body only when something changed, so every other body
reaches vLLM byte for byte.
"""

from __future__ import annotations

from typing import Any

from serve.gateway.errors import GatewayError
from serve.gateway.keys import Principal
from serve.gateway.routes import Route


def check_model(principal: Principal, model: str | None) -> None:
    """Raise when the key may not call ``model``. A request that names no model is served by vLLM with its
    base model, so a key limited to some models must name one.

    Raises:
        GatewayError: 403 ``model_not_allowed``, or 400 ``model_required``.
    """
    if model is None:
        if "*" not in principal.policy.models:
            raise GatewayError(
                400,
                f"Name the model: key {principal.name!r} may use only {', '.join(principal.policy.models)}.",
                "invalid_request_error",
                "model_required",
                "model",
            )
        return
    if not principal.policy.allows(model):
        raise GatewayError(
            403,
            f"Key {principal.name!r} may not use model {model!r} (it may use: "
            f"{', '.join(principal.policy.models)}); ask an admin to add it to the key's models.",
            "permission_error",
            "model_not_allowed",
            "model",
        )


def _positive_int(obj: dict[str, Any], name: str) -> int | None:
    """The integer vLLM would read from ``obj[name]``: its pydantic models also take a whole float
    (``5000.0``) or a string of digits (``"5000"``); anything else is left to vLLM to refuse."""
    value = obj.get(name)
    if value is None or type(value) is int:  # the usual cases (type(): a bool is not a count)
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value.strip())
    return None


def capped_fields(obj: dict[str, Any], route: Route, principal: Principal) -> dict[str, Any]:
    """The output-length and ``n`` fields to set under the key's caps (empty: nothing to change).

    A request above ``max_tokens`` is refused, or lowered to it when the key says ``clamp_max_tokens``;
    a request that sets no output length is given the cap (without one, vLLM generates up to the
    context length).

    Raises:
        GatewayError: 400 ``max_tokens_exceeded`` or ``n_exceeded``.
    """
    policy = principal.policy
    changes: dict[str, Any] = {}
    if policy.max_tokens is not None and route.max_tokens_fields:
        present = [(f, v) for f in route.max_tokens_fields if (v := _positive_int(obj, f)) is not None]
        for field, value in present:
            if value > policy.max_tokens:
                if not policy.clamp_max_tokens:
                    raise GatewayError(
                        400,
                        f"{field}={value} is above the cap of key {principal.name!r} ({policy.max_tokens}): "
                        f"ask for at most {policy.max_tokens}.",
                        "invalid_request_error",
                        "max_tokens_exceeded",
                        field,
                    )
                changes[field] = policy.max_tokens
        if not present and not any(obj.get(f) is not None for f in route.max_tokens_fields):
            changes[route.max_tokens_fields[0]] = policy.max_tokens
    if policy.max_n is not None and route.n_field is not None:
        n = _positive_int(obj, route.n_field)
        if n is not None and n > policy.max_n:
            raise GatewayError(
                400,
                f"{route.n_field}={n} is above the cap of key {principal.name!r} ({policy.max_n} choices per "
                "request).",
                "invalid_request_error",
                "n_exceeded",
                route.n_field,
            )
    return changes


def template_kwargs(obj: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any] | None:
    """``chat_template_kwargs`` with ``defaults`` under the keys the request does not set; None when
    nothing changes (or the request's field is malformed: vLLM reports it)."""
    given = obj.get("chat_template_kwargs")
    if given is None:
        given = {}
    if not isinstance(given, dict):
        return None
    merged = {**defaults, **given}
    return None if merged == given else merged


def stream_usage_options(obj: dict[str, Any]) -> tuple[dict[str, Any] | None, bool]:
    """For a streamed request on a route with ``stream_options``: the options that make vLLM report usage,
    and whether the client asked for the usage chunk itself.

    Returns:
        ``(new stream_options or None when already on, client_wants_usage)``.
    """
    options = obj.get("stream_options")
    if not isinstance(options, dict):
        options = {}
    if options.get("include_usage") is True:
        return None, True
    return {**options, "include_usage": True}, False


def output_reservation(obj: dict[str, Any] | None, route: Route, body_bytes: int, unbounded: int) -> int:
    """Tokens to reserve for a request: a prompt estimate (a token per 4 body bytes, an over-estimate for
    JSON) plus its output cap (``max_tokens`` and the like, times ``n``), or ``unbounded`` when it sets
    none."""
    output = None
    if obj is not None:
        for field in route.max_tokens_fields:
            value = _positive_int(obj, field)
            if value is not None:
                output = value if output is None else min(output, value)
        n = _positive_int(obj, route.n_field) if route.n_field else None
        if output is not None and n is not None and n > 1:
            output *= n
    return body_bytes // 4 + (output if output is not None else unbounded)
