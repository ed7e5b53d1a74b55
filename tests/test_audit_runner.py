"""The runner against an in-process fake OpenAI endpoint (httpx.MockTransport): fixed sampling in every
request, resumption (only missing keys are asked; a line cut short by a crash is tolerated), retries with
backoff, clear errors for a bad URL or a refused key, and the thinking-switch check."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from audit.probes import expand, load_probe_set
from audit.runner import (
    Arm,
    AuditError,
    Condition,
    Sampling,
    answer_jobs,
    has_thinking_switch,
    normalize_base_url,
    preflight,
    run_jobs,
    split_reasoning,
)
from audit.store import answered, read_records

ROOT = Path(__file__).resolve().parent.parent
BASE = "http://fake/v1"


class Fake:
    """Answers chat completions; ``fail_first`` 503s before each answer, ``thinking_switch`` makes
    ``enable_thinking`` change the prompt length, ``keys`` are the accepted bearer keys."""

    def __init__(self, fail_first: int = 0, thinking_switch: bool = False, keys: tuple[str, ...] = ("k",)):
        self.fail_first = fail_first
        self.thinking_switch = thinking_switch
        self.keys = keys
        self.bodies: list[dict[str, Any]] = []
        self.failures = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") not in {f"Bearer {k}" for k in self.keys}:
            return httpx.Response(401, json={"error": {"message": "invalid API key"}})
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m"}]})
        body = json.loads(request.content)
        if self.failures < self.fail_first:
            self.failures += 1
            return httpx.Response(503, headers={"retry-after": "0"}, json={"error": {"message": "starting"}})
        self.bodies.append(body)
        thinking = body.get("chat_template_kwargs", {}).get("enable_thinking")
        prompt_tokens = 10 + (5 if self.thinking_switch and not thinking else 0)
        message = {"role": "assistant", "content": f"About: {body['messages'][-1]['content']}"}
        if thinking:
            message["reasoning_content"] = "thinking..."
        return httpx.Response(
            200,
            json={
                "choices": [{"message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 3},
            },
        )


def client(fake: Fake) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(fake))


def jobs(thinking: tuple[bool, ...] = (False,)):
    probes = expand(load_probe_set(ROOT / "configs" / "audit" / "probes.yaml"), "tiny")
    arms = [Arm("baseline", "k"), Arm("policy", "k", system_prompt="Be balanced.")]
    conditions = [Condition(arm, t) for arm in arms for t in thinking]
    return answer_jobs(probes, conditions, "m", Sampling(max_tokens=16))


def run(out: Path, fake: Fake, todo=None, **kwargs) -> Any:
    async def go():
        async with client(fake) as c:
            return await run_jobs(
                todo or jobs(), out, BASE, client=c, concurrency=3, backoff_s=0.001, **kwargs
            )

    return asyncio.run(go())


def test_every_request_has_fixed_sampling_and_the_arm_s_system_prompt(tmp_path):
    fake = Fake()
    stats = run(tmp_path / "answers.jsonl", fake)
    assert stats.asked == 24 and stats.errors == 0
    for body in fake.bodies:
        assert body["temperature"] == 0.0 and body["seed"] == 1234 and body["max_tokens"] == 16
        assert body["chat_template_kwargs"] == {"enable_thinking": False}
    with_system = [b for b in fake.bodies if b["messages"][0]["role"] == "system"]
    assert len(with_system) == 12 and with_system[0]["messages"][0]["content"] == "Be balanced."
    records = list(read_records(tmp_path / "answers.jsonl"))
    assert {r["condition"] for r in records} == {"baseline/thinking-off", "policy/thinking-off"}
    assert all(r["answer"].startswith("About:") and r["usage"]["prompt_tokens"] == 10 for r in records)


def test_a_rerun_asks_only_what_is_missing_and_tolerates_a_partial_line(tmp_path):
    out = tmp_path / "answers.jsonl"
    run(out, Fake())
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    # A crash: the last 5 answers never written, the 6th cut in half (no newline).
    out.write_text("".join(lines[:-6]) + lines[-6][:40], encoding="utf-8")
    assert len(answered(out)) == 18
    fake = Fake()
    stats = run(out, fake)
    assert (stats.asked, stats.skipped) == (6, 18)
    assert len(fake.bodies) == 6
    assert len(answered(out)) == 24
    # Nothing left: a third run asks nothing.
    assert run(out, Fake()).asked == 0


def test_503s_are_retried_with_backoff(tmp_path):
    fake = Fake(fail_first=5)
    stats = run(tmp_path / "a.jsonl", fake, retries=6)
    assert stats.errors == 0 and fake.failures == 5 and len(fake.bodies) == 24


def test_exhausted_retries_are_recorded_as_errors_and_asked_again_next_time(tmp_path):
    out = tmp_path / "a.jsonl"
    one = jobs()[:1]
    stats = run(out, Fake(fail_first=100), todo=one, retries=1)
    assert stats.errors == 1
    record = next(read_records(out))
    assert "gave up after 2 tries" in record["error"] and "503" in record["error"]
    assert answered(out) == set()
    assert run(out, Fake(), todo=one).asked == 1 and len(answered(out)) == 1


def test_a_refused_key_stops_the_run_with_what_to_do(tmp_path):
    with pytest.raises(AuditError, match=r"refused the API key.*KIT_API_KEY"):
        run(tmp_path / "a.jsonl", Fake(keys=("other",)))


def test_preflight_picks_the_model_and_names_what_is_served():
    async def go(model, key="k"):
        async with client(Fake()) as c:
            return await preflight(c, BASE, key, model)

    assert asyncio.run(go(None)) == "m"
    with pytest.raises(AuditError, match=r"does not serve model 'x'.*lists: m"):
        asyncio.run(go("x"))
    with pytest.raises(AuditError, match="401"):
        asyncio.run(go("m", key="bad"))


def test_an_unreachable_base_url_is_a_clear_error():
    async def go():
        async with httpx.AsyncClient(timeout=2) as c:
            return await preflight(c, "http://127.0.0.1:9/v1", "k", None)

    with pytest.raises(AuditError, match=r"cannot reach http://127.0.0.1:9/v1.*--base-url"):
        asyncio.run(go())
    with pytest.raises(AuditError, match="expected an http"):
        normalize_base_url("localhost:8080")
    assert normalize_base_url("http://h:8080/") == "http://h:8080/v1"
    assert normalize_base_url("http://h:8080/v1/") == "http://h:8080/v1"


@pytest.mark.parametrize("switch", [True, False])
def test_the_thinking_switch_is_detected_from_prompt_lengths(switch):
    async def go():
        async with client(Fake(thinking_switch=switch)) as c:
            return await has_thinking_switch(c, BASE, "k", "m")

    assert asyncio.run(go()) is switch


def test_thinking_on_keeps_the_reasoning(tmp_path):
    out = tmp_path / "a.jsonl"
    run(out, Fake(), todo=jobs((True,)))
    records = list(read_records(out))
    assert all(r["reasoning"] == "thinking..." and r["thinking"] for r in records)
    assert split_reasoning({"content": "<think>hmm</think>\n\nAnswer."}) == ("Answer.", "hmm")
