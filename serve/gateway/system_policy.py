"""System-prompt policies: a configured system message the gateway adds to a key's or a model's requests.

A team uses one to steer the served model without touching clients (issue #11: a counter-slant
instruction, measured by ``make audit`` with and without it). Policies are defined once in the gateway
settings and referred to by id; the ledger records the id of the policy a request carried, never its
text::

    system_policies:
      balanced:
        content: "Answer questions about every country with the same standards ..."
        mode: merge            # or prepend
    model_system_policies:     # optional: every request to this model (or adapter) gets it
      Qwen/Qwen3.6-27B: balanced

A key's own policy (``kit key set NAME --system-policy balanced``) wins over its model's. Where the text
goes, per route:

- ``/v1/chat/completions``: ``merge`` puts it at the start of the first message when that is a
  ``system`` message (text content: joined with a blank line; a list of parts: a text part first),
  else inserts a system message first; ``prepend`` always inserts its own system message first. Chat
  templates that take one system message at the start only (Qwen's raise on any other) need ``merge``.
- ``/v1/messages`` (Anthropic ``system``, a string or text blocks): the text comes first, joined with a
  blank line (``merge``) or as its own block (``prepend``).
- ``/v1/responses``: the text comes first in ``instructions``.
- ``/v1/completions`` takes a raw prompt the policy cannot be added to: a key or model with a policy
  is refused there (400), so the policy cannot be bypassed by changing route.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve.gateway.errors import GatewayError


class SystemPolicy(BaseModel):
    """One configured system message.

    Attributes:
        content: the text added (non-empty).
        mode: ``merge`` (into the client's own system message, the default) or ``prepend`` (a message of
            its own before the client's); see the module docstring for each route.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    content: str = Field(min_length=1)
    mode: Literal["merge", "prepend"] = "merge"


def _joined(first: str, rest: str) -> str:
    return f"{first}\n\n{rest}" if rest else first


def _chat(obj: dict[str, Any], policy: SystemPolicy) -> dict[str, Any]:
    messages = obj.get("messages")
    if not isinstance(messages, list):
        return {}  # vLLM answers a request without messages with its own 400
    own = {"role": "system", "content": policy.content}
    head = messages[0] if messages else None
    if policy.mode == "prepend" or not (isinstance(head, dict) and head.get("role") == "system"):
        return {"messages": [own, *messages]}
    content = head.get("content")
    if isinstance(content, str):
        merged: Any = _joined(policy.content, content)
    elif isinstance(content, list):
        merged = [{"type": "text", "text": policy.content}, *content]
    else:
        return {"messages": [own, *messages]}
    return {"messages": [{**head, "content": merged}, *messages[1:]]}


def _messages(obj: dict[str, Any], policy: SystemPolicy) -> dict[str, Any]:
    system = obj.get("system")
    block = {"type": "text", "text": policy.content}
    if isinstance(system, list):
        head = system[0] if system else None
        if policy.mode == "merge" and isinstance(head, dict) and head.get("type") == "text":
            first = {**head, "text": _joined(policy.content, str(head.get("text", "")))}
            return {"system": [first, *system[1:]]}
        return {"system": [block, *system]}
    if isinstance(system, str) and system:
        if policy.mode == "prepend":
            return {"system": [block, {"type": "text", "text": system}]}
        return {"system": _joined(policy.content, system)}
    return {"system": policy.content}


def _responses(obj: dict[str, Any], policy: SystemPolicy) -> dict[str, Any]:
    instructions = obj.get("instructions")
    return {"instructions": _joined(policy.content, instructions if isinstance(instructions, str) else "")}


def system_fields(path: str, obj: dict[str, Any], policy_id: str, policy: SystemPolicy) -> dict[str, Any]:
    """The top-level request fields that carry ``policy`` on route ``path``.

    Args:
        path: the route (``/v1/chat/completions``, ``/v1/messages``, ``/v1/responses``; others generate
            from a raw prompt).
        obj: the request's JSON object (not modified).
        policy_id: for the error message.
        policy: the policy to apply.

    Returns:
        Fields to set on the request body (``messages``, ``system`` or ``instructions``).

    Raises:
        GatewayError: 400 on a route whose prompt the policy cannot be added to.
    """
    if path == "/v1/chat/completions":
        return _chat(obj, policy)
    if path == "/v1/messages":
        return _messages(obj, policy)
    if path == "/v1/responses":
        return _responses(obj, policy)
    raise GatewayError(
        400,
        f"This key's requests carry the system policy {policy_id!r}, which cannot be added to a raw "
        f"prompt on {path}: use /v1/chat/completions, /v1/messages or /v1/responses.",
        "invalid_request_error",
        "system_policy_route",
    )
