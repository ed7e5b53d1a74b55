"""Thinking under control: whether a request thinks, how many tokens it may think, and the sampling
preset a non-thinking answer gets. Every thinking token is generated and billed like any other.

What the served vLLM (0.32) supports, and what this module does with it:

- Thinking on/off: Qwen3 chat templates read ``chat_template_kwargs.enable_thinking``. On
  ``/v1/chat/completions`` the gateway sets it from, in order: the request's own value, the key's
  default (``make key THINKING=off``), a JSON-schema ``response_format`` (off: thinking plus strict
  JSON is a known failure), the served model's default. On ``/v1/messages`` the Anthropic
  ``thinking: {type: disabled}`` is passed to vLLM, which turns it into ``enable_thinking: false``
  (vllm/entrypoints/anthropic/serving.py); a key that defaults to off gets it when the client sends no
  ``thinking``.
- A thinking budget: vLLM's ``thinking_token_budget`` request field (chat completions; the Anthropic
  route maps ``thinking.budget_tokens`` onto it) counts reasoning tokens and, at the budget, forces the
  reasoning end marker, so the answer is still produced (vllm/v1/sample/thinking_budget_state.py). It
  needs the server's reasoning parser (``--reasoning-parser``, set by every kit profile of a thinking
  model); without one vLLM refuses the request with a 400 naming ``--reasoning-config``. The key's
  ``thinking_budget`` caps what a request asks for and is set when it asks for none. The Anthropic API
  takes no budget under 1024 tokens (``budget_tokens >= 1024`` in vLLM's protocol and Anthropic's), so
  on ``/v1/messages`` a key whose budget is smaller gets thinking off unless the client asks for
  thinking, which is then refused with a 400 that says why.
- When thinking is off and the request sets no sampling field, the model card's non-thinking preset
  (``sampling.non_thinking`` in ``configs/models/<model>.yaml``, given to the gateway per served model)
  is applied: vLLM's default is the generation config's, which is the thinking preset.
"""

from __future__ import annotations

from typing import Any

from serve.gateway.errors import GatewayError
from serve.gateway.keys import KeyPolicy, Principal
from serve.gateway.settings import GatewaySettings

ANTHROPIC_MIN_BUDGET = 1024
"""The least ``thinking.budget_tokens`` the Anthropic Messages API accepts (vLLM's protocol enforces it)."""

SAMPLING_FIELDS = frozenset(
    {"temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"}
)
"""Request fields that mean "the client chose its sampling": no preset is applied over any of them."""
ANTHROPIC_SAMPLING_FIELDS = frozenset({"temperature", "top_p", "top_k"})
"""The sampling fields the Anthropic Messages API has (vLLM drops the others there)."""


def _json_schema_format(obj: dict[str, Any]) -> bool:
    response_format = obj.get("response_format")
    return isinstance(response_format, dict) and response_format.get("type") == "json_schema"


def may_change(
    obj: dict[str, Any], kind: str, policy: KeyPolicy, model: str, settings: GatewaySettings
) -> bool:
    """Whether the thinking rules can change a request of route kind ``kind`` (``chat`` or
    ``anthropic``) for a key with ``policy`` on ``model``; False lets the caller skip them.

    They can only when the key sets ``enable_thinking`` or ``thinking_budget``, the gateway has
    template defaults or a non-thinking preset for the model, or (chat) the request asks for a JSON
    schema (thinking goes off). Otherwise ``chat_thinking`` and ``messages_thinking`` decide nothing the
    request does not already say, and no preset applies (tests/test_gateway_thinking.py checks the two
    agree)."""
    return (
        policy.enable_thinking is not None
        or policy.thinking_budget is not None
        or model in settings.non_thinking_sampling
        or model in settings.default_chat_template_kwargs
        or (kind == "chat" and _json_schema_format(obj))
    )


def chat_thinking(
    obj: dict[str, Any], principal: Principal, model_default: bool | None
) -> tuple[bool | None, dict[str, Any]]:
    """Thinking on a ``/v1/chat/completions`` request.

    Args:
        obj: the request's JSON object.
        principal: the calling key.
        model_default: ``enable_thinking`` the gateway's per-model defaults give (None: the template's).

    Returns:
        ``(thinking, changes)``: whether the request thinks (None: the template decides, which is on for
        Qwen3; the caller puts a decided value under ``chat_template_kwargs.enable_thinking`` unless the
        client set it) and the top-level fields to change (``thinking_token_budget``).
    """
    given = obj.get("chat_template_kwargs")
    thinking = given.get("enable_thinking") if isinstance(given, dict) else None
    if not isinstance(thinking, bool):
        thinking = principal.policy.enable_thinking
        if thinking is None and _json_schema_format(obj):
            thinking = False
        if thinking is None:
            thinking = model_default
    budget = principal.policy.thinking_budget
    if budget is not None and thinking is not False:
        asked = obj.get("thinking_token_budget")
        if not isinstance(asked, int) or isinstance(asked, bool) or asked < 0 or asked > budget:
            return thinking, {"thinking_token_budget": budget}
    return thinking, {}


def messages_thinking(obj: dict[str, Any], principal: Principal) -> tuple[bool | None, dict[str, Any]]:
    """Thinking on a ``/v1/messages`` request (Anthropic ``thinking``), as ``chat_thinking``.

    Raises:
        GatewayError: 400 when the client asks for thinking and the key's budget is under the Anthropic
            minimum of 1024 tokens.
    """
    policy = principal.policy
    given = obj.get("thinking")
    kind = given.get("type") if isinstance(given, dict) else None
    budget = policy.thinking_budget
    if kind == "disabled":
        return False, {}
    if kind is None and policy.enable_thinking is False:
        return False, {"thinking": {"type": "disabled"}}
    if budget is None:
        return (True if kind == "enabled" else None), {}
    max_tokens = obj.get("max_tokens")
    if kind == "enabled":
        asked = given.get("budget_tokens") if isinstance(given, dict) else None
        if budget < ANTHROPIC_MIN_BUDGET:
            raise GatewayError(
                400,
                f"Key {principal.name!r} may think at most {budget} tokens per request, under the "
                f"Anthropic API's minimum budget_tokens of {ANTHROPIC_MIN_BUDGET}: send thinking "
                '{"type": "disabled"}, or use /v1/chat/completions with thinking_token_budget.',
                "invalid_request_error",
                "thinking_budget_exceeded",
                "thinking.budget_tokens",
            )
        if isinstance(asked, int) and not isinstance(asked, bool) and asked > budget:
            return True, {"thinking": {**given, "budget_tokens": budget}}
        return True, {}
    # No thinking field: the template thinks by default; hold it to the key's budget.
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens <= budget:
        return None, {}  # thinking cannot outgrow the whole answer's cap
    if budget < ANTHROPIC_MIN_BUDGET:
        return False, {"thinking": {"type": "disabled"}}
    return True, {"thinking": {"type": "enabled", "budget_tokens": budget}}


def non_thinking_preset(obj: dict[str, Any], preset: dict[str, Any] | None) -> dict[str, Any]:
    """The model's non-thinking sampling preset, when the request sets no sampling field itself."""
    if not preset or any(name in obj for name in SAMPLING_FIELDS):
        return {}
    return dict(preset)
