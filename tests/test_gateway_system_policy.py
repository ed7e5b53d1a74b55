"""System-prompt policies (serve/gateway/system_policy.py), observed in what reaches the (fake) vLLM and in
the ledger: a key's policy and a model's policy, merge and prepend on chat, messages and responses, the
policy id (never its text) in the ledger, refusal where it cannot be applied, fail-closed when the
settings lose a policy a key names, and the CLI's check of the id. The real-vLLM side (the rendered
prompt grows by the policy's tokens) is in tests/integration/test_audit.py."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from serve.gateway.keys import KeyError_, KeyPolicy, KeyStore
from serve.gateway.settings import GatewaySettings
from serve.gateway.system_policy import SystemPolicy, system_fields
from serve.keys_cli import add_key_arguments, cmd_key
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

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
FAIR = "Judge every country by the same standard."
POLICIES = {
    "fair": {"content": FAIR},
    "fair-apart": {"content": FAIR, "mode": "prepend"},
}


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
        system_policies=POLICIES,
        model_system_policies={"team-a": "fair"},
    )
    return started


# --- where the text goes, route by route ----------------------------------------------------------


def test_chat_merge_joins_the_clients_system_message_and_prepend_adds_its_own():
    merge, prepend = SystemPolicy(content=FAIR), SystemPolicy(content=FAIR, mode="prepend")
    with_system = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    }
    assert system_fields(CHAT, with_system, "p", merge)["messages"] == [
        {"role": "system", "content": f"{FAIR}\n\nBe brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert system_fields(CHAT, with_system, "p", prepend)["messages"] == [
        {"role": "system", "content": FAIR},
        *with_system["messages"],
    ]
    bare = {"messages": [{"role": "user", "content": "Hi"}]}
    assert system_fields(CHAT, bare, "p", merge)["messages"][0] == {"role": "system", "content": FAIR}
    parts = {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}]}
    assert system_fields(CHAT, parts, "p", merge)["messages"][0]["content"] == [
        {"type": "text", "text": FAIR},
        {"type": "text", "text": "Be brief."},
    ]
    # The client's request object is not modified (the gateway splices the result into the body).
    assert with_system["messages"][0] == {"role": "system", "content": "Be brief."}


def test_messages_and_responses_put_the_text_first_in_system_and_instructions():
    merge, prepend = SystemPolicy(content=FAIR), SystemPolicy(content=FAIR, mode="prepend")
    assert system_fields(MESSAGES, {}, "p", merge) == {"system": FAIR}
    assert system_fields(MESSAGES, {"system": "Be brief."}, "p", merge) == {"system": f"{FAIR}\n\nBe brief."}
    assert system_fields(MESSAGES, {"system": "Be brief."}, "p", prepend) == {
        "system": [{"type": "text", "text": FAIR}, {"type": "text", "text": "Be brief."}]
    }
    blocks = {"system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]}
    assert system_fields(MESSAGES, blocks, "p", merge) == {
        "system": [{"type": "text", "text": f"{FAIR}\n\nBe brief.", "cache_control": {"type": "ephemeral"}}]
    }
    assert system_fields("/v1/responses", {"instructions": "Be brief."}, "p", merge) == {
        "instructions": f"{FAIR}\n\nBe brief."
    }
    assert system_fields("/v1/responses", {}, "p", merge) == {"instructions": FAIR}


# --- through the gateway -------------------------------------------------------------------------


def test_a_keys_policy_reaches_vllm_and_the_ledger_gets_its_id_not_its_text(gateway, upstream):
    _, seen = upstream
    key = add_key(gateway, "audited", system_policy="fair")
    plain = add_key(gateway, "plain")
    sent = relayed(gateway, seen, key, CHAT, chat_body("m", messages=[{"role": "system", "content": "Hi."}]))
    assert sent["messages"][0] == {"role": "system", "content": f"{FAIR}\n\nHi."}
    assert relayed(gateway, seen, key, MESSAGES, messages_body("m"))["system"] == FAIR
    assert relayed(gateway, seen, key, "/v1/responses", {"model": "m", "input": "Hi"})["instructions"] == FAIR
    counted = relayed(gateway, seen, key, "/v1/messages/count_tokens", messages_body("m"))
    assert counted["system"] == FAIR, "count_tokens counts the prompt the model will really get"
    untouched = relayed(gateway, seen, plain, CHAT, chat_body("m"))
    assert untouched["messages"] == [{"role": "user", "content": "Hi"}]
    rows = stopped_ledger(gateway).values()
    assert {r["key_name"]: r["policy_id"] for r in rows if r["route"] == CHAT} == {
        "audited": "fair",
        "plain": None,
    }
    assert all(FAIR not in json.dumps(r, default=str) for r in rows)


def test_a_models_policy_applies_to_every_key_and_a_keys_own_policy_wins(gateway, upstream):
    _, seen = upstream
    plain = add_key(gateway, "plain")
    own = add_key(gateway, "own", system_policy="fair-apart")
    assert relayed(gateway, seen, plain, CHAT, chat_body("team-a"))["messages"][0]["content"] == FAIR
    assert relayed(gateway, seen, plain, CHAT, chat_body("m"))["messages"][0]["role"] == "user"
    apart = relayed(
        gateway, seen, own, CHAT, chat_body("team-a", messages=[{"role": "system", "content": "X"}])
    )
    assert [m["content"] for m in apart["messages"][:2]] == [FAIR, "X"]


def test_a_raw_prompt_route_is_refused_for_a_key_with_a_policy(gateway, upstream):
    _, seen = upstream
    key = add_key(gateway, "audited", system_policy="fair")
    reply = post(gateway, key, "/v1/completions", {"model": "m", "prompt": "Hi", "max_tokens": 2})
    assert_openai_error(reply, 400, "system_policy_route")
    assert seen.bodies("/v1/completions") == []


def test_a_policy_missing_from_the_settings_fails_closed(gateway, upstream):
    _, seen = upstream
    key = add_key(gateway, "orphan", system_policy="gone")
    assert_openai_error(post(gateway, key, CHAT, chat_body("m")), 500, "system_policy_missing")
    assert_anthropic_error(post(gateway, key, MESSAGES, messages_body("m")), 500, "api_error")
    assert seen.bodies(CHAT) == [] and seen.bodies(MESSAGES) == []


# --- configuration and the CLI -------------------------------------------------------------------


def test_settings_refuse_a_model_policy_naming_an_undefined_id_and_an_empty_text(tmp_path):
    with pytest.raises(ValidationError, match="names policy 'nope'"):
        GatewaySettings(keys_db=tmp_path / "k.sqlite", model_system_policies={"m": "nope"})
    with pytest.raises(ValidationError, match="at least 1 character"):
        GatewaySettings(keys_db=tmp_path / "k.sqlite", system_policies={"x": {"content": ""}})


def test_key_create_and_set_check_the_policy_id_against_the_settings(tmp_path, capsys):
    settings = GatewaySettings(keys_db=tmp_path / "k.sqlite", create_keys_db=True, system_policies=POLICIES)
    parser = argparse.ArgumentParser()
    add_key_arguments(parser)
    with pytest.raises(KeyError_, match=r"no such policy \(fair, fair-apart\)"):
        cmd_key(parser.parse_args(["create", "a", "--system-policy", "typo"]), settings)
    cmd_key(parser.parse_args(["create", "a", "--system-policy", "fair"]), settings)
    assert "system_policy=fair" in capsys.readouterr().out
    store = KeyStore(settings.database)
    assert store.list()[0].policy.system_policy == "fair"
    cmd_key(parser.parse_args(["set", "a", "--system-policy", "none"]), settings)
    assert store.list()[0].policy == KeyPolicy()
