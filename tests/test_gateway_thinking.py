"""Thinking under control and model aliases, observed in what reaches the (fake) vLLM.

Thinking on/off per key and per request, the key's thinking budget as vLLM's ``thinking_token_budget``
(chat) or Anthropic ``thinking.budget_tokens`` (messages), JSON-schema requests defaulting to thinking
off, the model card's non-thinking preset when a request does not think and chose no sampling; aliases
that map a client's model id to a served model, checked against the key's models, listed in
``/v1/models`` and recorded in the ledger as the served model. The real vLLM side of the budget (it
stops reasoning and still answers) is covered in tests/integration/test_team.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from serve.gateway.keys import KeyPolicy, Principal
from serve.gateway.thinking import chat_thinking, messages_thinking, non_thinking_preset
from tests.test_gateway_policy import (
    add_key,
    assert_anthropic_error,
    assert_openai_error,
    chat_body,
    fake_upstream,
    messages_body,
    post,
    relayed,
)
from tests.test_ledger import stopped_ledger

NON_THINKING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "presence_penalty": 1.5}
CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"


def _principal(**policy: Any) -> Principal:
    return Principal("k", "00000000", KeyPolicy(**policy))


@pytest.fixture
def upstream(serve_aiohttp: Callable[[Any], Any]) -> tuple[Any, Any]:
    app, seen = fake_upstream()
    return serve_aiohttp(app), seen


@pytest.fixture
def gateway(upstream: tuple[Any, Any], gateway_factory: Callable[..., tuple[Any, str]]) -> Any:
    server, _ = upstream
    started, _ = gateway_factory(
        server.url,
        key_cache_ttl_s=0,
        model_aliases={"claude-*": "m", "gpt-4o": "team-a", "gpt-4o-mini": "missing"},
        non_thinking_sampling={"m": NON_THINKING},
    )
    return started


# --- the rules, unit by unit -------------------------------------------------------------------------


def test_chat_thinking_takes_the_request_then_the_key_then_json_schema_then_the_model():
    assert (
        chat_thinking(
            {"chat_template_kwargs": {"enable_thinking": True}}, _principal(enable_thinking=False), None
        )[0]
        is True
    )
    assert chat_thinking({}, _principal(enable_thinking=False), True)[0] is False
    schema = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}
    assert chat_thinking(schema, _principal(), True)[0] is False
    assert chat_thinking({**schema, "chat_template_kwargs": {"enable_thinking": True}}, _principal(), None)[0]
    assert chat_thinking({"response_format": {"type": "json_object"}}, _principal(), None)[0] is None
    assert chat_thinking({}, _principal(), True)[0] is True


def test_chat_thinking_budget_caps_what_the_request_asks_and_fills_it_in():
    key = _principal(thinking_budget=256)
    assert chat_thinking({}, key, None)[1] == {"thinking_token_budget": 256}
    assert chat_thinking({"thinking_token_budget": 1000}, key, None)[1] == {"thinking_token_budget": 256}
    assert chat_thinking({"thinking_token_budget": 100}, key, None)[1] == {}
    assert chat_thinking({"thinking_token_budget": "9999"}, key, None)[1] == {"thinking_token_budget": 256}
    # No thinking, no budget to set.
    assert chat_thinking({"chat_template_kwargs": {"enable_thinking": False}}, key, None)[1] == {}


def test_messages_thinking_maps_the_key_onto_anthropic_thinking():
    assert messages_thinking({}, _principal(enable_thinking=False)) == (
        False,
        {"thinking": {"type": "disabled"}},
    )
    assert messages_thinking({"thinking": {"type": "disabled"}}, _principal(thinking_budget=2048)) == (
        False,
        {},
    )
    big = {"max_tokens": 8000, "thinking": {"type": "enabled", "budget_tokens": 5000}}
    assert messages_thinking(big, _principal(thinking_budget=2048)) == (
        True,
        {"thinking": {"type": "enabled", "budget_tokens": 2048}},
    )
    assert messages_thinking({"max_tokens": 8000}, _principal(thinking_budget=2048)) == (
        True,
        {"thinking": {"type": "enabled", "budget_tokens": 2048}},
    )
    # max_tokens already below the budget: thinking cannot outgrow it, nothing to add.
    assert messages_thinking({"max_tokens": 500}, _principal(thinking_budget=2048)) == (None, {})
    # Under Anthropic's minimum of 1024: thinking off unless asked for, and then a clear refusal.
    assert messages_thinking({"max_tokens": 8000}, _principal(thinking_budget=300)) == (
        False,
        {"thinking": {"type": "disabled"}},
    )
    with pytest.raises(Exception, match="minimum budget_tokens of 1024"):
        messages_thinking(big, _principal(thinking_budget=300))


def test_the_non_thinking_preset_only_fills_a_request_that_chose_no_sampling():
    assert non_thinking_preset({}, NON_THINKING) == NON_THINKING
    assert non_thinking_preset({"temperature": 0}, NON_THINKING) == {}
    assert non_thinking_preset({"top_k": 5}, NON_THINKING) == {}
    assert non_thinking_preset({}, None) == {}


# --- through the gateway -----------------------------------------------------------------------------


def test_a_key_with_thinking_off_gets_the_non_thinking_preset_on_chat_and_messages(gateway, upstream):
    _, seen = upstream
    key = add_key(gateway, "quick", enable_thinking=False)
    body = relayed(gateway, seen, key, CHAT, chat_body())
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert {k: body[k] for k in NON_THINKING} == NON_THINKING
    chosen = relayed(gateway, seen, key, CHAT, chat_body(temperature=0.1))
    assert chosen["temperature"] == 0.1 and "presence_penalty" not in chosen and "top_k" not in chosen
    messages = relayed(gateway, seen, key, MESSAGES, messages_body())
    assert messages["thinking"] == {"type": "disabled"}
    # The Anthropic API has temperature, top_p and top_k; presence_penalty is not one of its fields.
    assert {k: messages.get(k) for k in ("temperature", "top_p", "top_k")} == {
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
    }
    assert "presence_penalty" not in messages


def test_thinking_requests_keep_the_models_own_sampling(gateway, upstream):
    _, seen = upstream
    key = add_key(gateway, "plain")
    raw = json.dumps(chat_body(), separators=(",", ":")).encode()
    assert post(gateway, key, CHAT, raw).status_code == 200
    assert seen.bodies(CHAT)[-1] == raw  # nothing decided: the body reaches vLLM byte for byte


def test_a_json_schema_request_thinks_only_when_it_asks(gateway, upstream):
    _, seen = upstream
    key = add_key(gateway, "plain")
    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}
    body = relayed(gateway, seen, key, CHAT, chat_body(response_format=schema))
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    asked = relayed(
        gateway,
        seen,
        key,
        CHAT,
        chat_body(response_format=schema, chat_template_kwargs={"enable_thinking": True}),
    )
    assert asked["chat_template_kwargs"] == {"enable_thinking": True} and "presence_penalty" not in asked


def test_the_keys_thinking_budget_reaches_vllm_on_both_apis(gateway, upstream):
    _, seen = upstream
    key = add_key(gateway, "thrifty", thinking_budget=1500)
    assert relayed(gateway, seen, key, CHAT, chat_body())["thinking_token_budget"] == 1500
    assert (
        relayed(gateway, seen, key, CHAT, chat_body(thinking_token_budget=99999))["thinking_token_budget"]
        == 1500
    )
    messages = relayed(gateway, seen, key, MESSAGES, messages_body(max_tokens=4000))
    assert messages["thinking"] == {"type": "enabled", "budget_tokens": 1500}
    tiny = add_key(gateway, "tiny", thinking_budget=200)
    reply = post(
        gateway,
        tiny,
        MESSAGES,
        messages_body(max_tokens=4000, thinking={"type": "enabled", "budget_tokens": 2000}),
    )
    assert "1024" in assert_anthropic_error(reply, 400, "invalid_request_error")


def test_an_alias_reaches_vllm_as_the_served_model_and_the_ledger_records_that(gateway, upstream):
    _, seen = upstream
    key = add_key(gateway, "claude-user", models=("m",))
    claude = messages_body(model="claude-sonnet-4-5-20250929")
    reply = post(gateway, key, MESSAGES, claude, request_id="alias-1")
    assert reply.status_code == 200, reply.text
    assert seen.last(MESSAGES)["model"] == "m"
    # The key's model list applies to what the alias stands for: gpt-4o is team-a, not allowed here.
    assert_openai_error(post(gateway, key, CHAT, chat_body(model="gpt-4o")), 403, "model_not_allowed")
    rows = stopped_ledger(gateway)
    assert rows["alias-1"]["model"] == "m" and rows["alias-1"]["key_name"] == "claude-user"


def test_models_listing_shows_the_exact_aliases_of_models_the_key_may_use(gateway, upstream):
    key = add_key(gateway, "listing", models=("team-a",))
    reply = httpx.get(gateway.url + "/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=10)
    assert reply.status_code == 200
    entries = {entry["id"]: entry for entry in reply.json()["data"]}
    assert set(entries) == {"team-a", "gpt-4o"}, entries  # no glob, no alias of a model it may not use
    assert entries["gpt-4o"]["root"] == "team-a"


def test_requests_the_thinking_rules_cannot_change_are_rewritten_as_if_the_rules_ran(monkeypatch):
    # proxy.rewrite skips the thinking rules where thinking.may_change says they change nothing: for
    # every request, key and model here, the fields it sends upstream must be those of the full rules.
    from types import SimpleNamespace

    from serve.gateway import proxy, thinking
    from serve.gateway.aliases import Aliases
    from serve.gateway.routes import ROUTES
    from serve.gateway.settings import GatewaySettings

    settings = GatewaySettings(
        non_thinking_sampling={"preset-model": NON_THINKING},
        default_chat_template_kwargs={"defaults-model": {"enable_thinking": False}},
    )
    gateway = SimpleNamespace(settings=settings, aliases=Aliases({}))
    routes = [r for r in ROUTES if r.path in (CHAT, MESSAGES)]
    requests = [
        {},
        {"chat_template_kwargs": {"enable_thinking": False}},
        {"chat_template_kwargs": {"enable_thinking": True}, "temperature": 0.1},
        {"response_format": {"type": "json_schema", "json_schema": {}}},
        {"response_format": {"type": "json_object"}},
        {"thinking": {"type": "disabled"}},
        {"thinking": {"type": "enabled", "budget_tokens": 2048}, "max_tokens": 4096},
        {"thinking_token_budget": 10, "max_tokens": 100},
    ]
    policies = [{}, {"enable_thinking": False}, {"enable_thinking": True}, {"thinking_budget": 2000}]
    skipped = 0
    for route in routes:
        for model in ("m", "preset-model", "defaults-model"):
            for extra in requests:
                for policy in policies:
                    obj = {"model": model, "messages": [], **extra}
                    principal = _principal(**policy)
                    if not thinking.may_change(obj, route.thinking, principal.policy, model, settings):
                        skipped += 1

                    def rewritten(obj=obj, principal=principal, route=route, model=model) -> Any:
                        call = proxy.Call("rid", route, 0.0, 0.0, principal=principal, model=model)
                        return proxy.rewrite(gateway, call, json.loads(json.dumps(obj)))  # type: ignore[arg-type]

                    fast = rewritten()
                    with monkeypatch.context() as patched:
                        patched.setattr(thinking, "may_change", lambda *args: True)
                        assert rewritten() == fast, (route.path, model, extra, policy)
    assert skipped > 0  # the fast path was taken somewhere, or this test proves nothing
