"""The allowlisted upstream routes, each declaring what the gateway does on it.

vLLM leaves ``/invocations``, ``/pause``, ``/update_weights``... unauthenticated even with ``--api-key``, and
``/v1/load_lora_adapter`` changes what it serves (docs/reference.md, "vLLM security"): only these paths
reach it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    """One allowlisted upstream route.

    Attributes:
        path / method: what the client calls (forwarded to the same path upstream).
        api: ``openai`` or ``anthropic``: the error shape and the stream error framing.
        max_tokens_fields: request fields that cap the output (checked against the key's ``max_tokens``).
        n_field: the field asking for several choices (``n``), if the API has one.
        stream_usage: the route takes ``stream_options.include_usage`` (the gateway turns it on).
        template_kwargs: the route takes ``chat_template_kwargs`` (thinking defaults go there).
        generates: the route makes the model generate (admission, token reservation).
        thinking_text: reasoning arrives as text only (Anthropic thinking blocks): count it with the
            served tokenizer when the upstream reports no reasoning tokens.
        lists_models: the answer is the model listing (filtered to what the key may use).
        local: the gateway answers it itself (never forwarded).
        thinking: how the request turns thinking on or off and caps it: ``chat`` (``chat_template_kwargs``
            and ``thinking_token_budget``) or ``anthropic`` (``thinking``); see ``thinking.py``.
        stream_end: the bytes of the event that ends a streamed answer on this route (OpenAI's
            ``data: [DONE]``, the Responses API's ``response.completed``, Anthropic's ``message_stop``):
            clients such as the openai SDK hang up once they read it, possibly before the upstream's
            response has ended.
    """

    path: str
    method: str
    api: str = "openai"
    max_tokens_fields: tuple[str, ...] = ()
    n_field: str | None = None
    stream_usage: bool = False
    template_kwargs: bool = False
    generates: bool = True
    thinking_text: bool = False
    lists_models: bool = False
    thinking: str | None = None
    local: bool = False
    stream_end: bytes = b"data: [DONE]"


ROUTES = (
    Route(
        "/v1/chat/completions",
        "POST",
        max_tokens_fields=("max_tokens", "max_completion_tokens"),
        n_field="n",
        stream_usage=True,
        template_kwargs=True,
        thinking="chat",
    ),
    Route("/v1/completions", "POST", max_tokens_fields=("max_tokens",), n_field="n", stream_usage=True),
    Route(
        "/v1/responses",
        "POST",
        max_tokens_fields=("max_output_tokens",),
        stream_end=b"event: response.completed",
    ),
    Route("/v1/models", "GET", generates=False, lists_models=True),
    Route(
        "/v1/messages",
        "POST",
        api="anthropic",
        max_tokens_fields=("max_tokens",),
        thinking_text=True,
        thinking="anthropic",
        stream_end=b"event: message_stop",
    ),
    Route("/v1/messages/count_tokens", "POST", api="anthropic", generates=False),
)

# The gateway's own routes (not forwarded).
USAGE_PATH = "/v1/usage"
