"""Ask an OpenAI-compatible endpoint every probe under every condition, resumably.

A condition is an *arm* (``baseline``, or ``policy``: another API key, e.g. one the gateway gives a
system-prompt policy, or a client-side system message) crossed with thinking off / on
(``chat_template_kwargs.enable_thinking``, the switch of Qwen3-family chat templates). Sampling is fixed
(temperature 0 and a seed) so a rerun asks the same question the same way. Requests run concurrently on
one ``httpx.AsyncClient`` (a bounded pool), with retries and exponential backoff on 429 / 5xx /
connection errors (``Retry-After`` honoured), and a tqdm progress bar. Every answer (content, reasoning,
finish reason, usage) goes to an append-only JSONL (``audit/store.py``), so a run can be re-scored without
asking again, and a rerun after a crash asks only what is missing.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from audit.probes import Probe
from audit.store import Appender, Key, answered

logger = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class AuditError(Exception):
    """Something the user must fix (unreachable URL, refused key, unknown model); the message says what."""


@dataclass(frozen=True)
class Sampling:
    """Fixed sampling for every request: greedy with a seed, so reruns and arms are comparable."""

    temperature: float = 0.0
    seed: int = 1234
    max_tokens: int = 512
    """Output tokens per answer (thinking off)."""
    max_tokens_thinking: int = 2048
    """Output tokens per answer with thinking on (reasoning + answer)."""


@dataclass(frozen=True)
class Arm:
    """One side of the before/after comparison."""

    name: str
    """``baseline`` or ``policy`` (any word: it names the condition)."""
    api_key: str | None
    system_prompt: str | None = None
    """A system message the client itself sends (for endpoints without the gateway's policies)."""


@dataclass(frozen=True)
class Condition:
    arm: Arm
    thinking: bool

    @property
    def id(self) -> str:
        return f"{self.arm.name}/thinking-{'on' if self.thinking else 'off'}"


@dataclass(frozen=True)
class Job:
    """One request: its resume key, the chat-completions body, and the fields its record keeps."""

    key: Key
    api_key: str | None
    body: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)


def normalize_base_url(url: str) -> str:
    """``http://host:8080`` or ``http://host:8080/v1/`` -> ``http://host:8080/v1``.

    Raises:
        AuditError: not an http(s) URL.
    """
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise AuditError(f"--base-url {url!r}: expected an http(s) URL such as http://127.0.0.1:8080/v1")
    return url if url.endswith("/v1") else url + "/v1"


def _headers(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def _refusal_message(status: int, text: str, base_url: str) -> str:
    detail = text[:300].strip()
    if status == 401:
        return (
            f"{base_url} refused the API key (401: {detail}). Pass a valid key with --api-key or "
            "KIT_API_KEY (create one with `make key NAME=audit`)."
        )
    if status == 403:
        return f"{base_url} does not let this key do that (403: {detail}); `make key-list` shows its policy."
    if status == 404:
        return f"{base_url}: not found (404: {detail}). Check --base-url (it should end in /v1) and --model."
    return f"{base_url} answered {status}: {detail}"


async def preflight(client: httpx.AsyncClient, base_url: str, api_key: str | None, model: str | None) -> str:
    """Check the endpoint answers with this key and serves ``model``; return the model to use.

    Raises:
        AuditError: unreachable, key refused, or the model is not listed (the message lists what is).
    """
    try:
        reply = await client.get(f"{base_url}/models", headers=_headers(api_key))
    except httpx.TransportError as exc:
        raise AuditError(
            f"cannot reach {base_url} ({type(exc).__name__}: {exc}). Is the gateway running (`make up` / "
            "`make start`)? Pass --base-url / BASE_URL= for another endpoint."
        ) from None
    if reply.status_code != 200:
        raise AuditError(_refusal_message(reply.status_code, reply.text, base_url))
    try:
        ids = [m["id"] for m in reply.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise AuditError(
            f"{base_url}/models did not answer an OpenAI model list: {reply.text[:200]}"
        ) from None
    if model is None:
        if not ids:
            raise AuditError(f"{base_url} lists no models for this key")
        return str(ids[0])
    if model not in ids:
        raise AuditError(
            f"{base_url} does not serve model {model!r} for this key; it lists: {', '.join(ids)}"
        )
    return model


async def has_thinking_switch(
    client: httpx.AsyncClient, base_url: str, api_key: str | None, model: str
) -> bool:
    """Whether ``enable_thinking`` changes what the model is given.

    Renders the same one-token request with thinking on and off and compares ``usage.prompt_tokens``: a
    Qwen3-family template adds an empty ``<think></think>`` block when thinking is off; a template without
    the switch (SmolLM2's ChatML) ignores the flag and both prompts have the same length.

    Raises:
        AuditError: the endpoint refused either request.
    """
    counts = []
    for thinking in (True, False):
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 1,
            "temperature": 0,
            "chat_template_kwargs": {"enable_thinking": thinking},
        }
        reply = await client.post(f"{base_url}/chat/completions", json=body, headers=_headers(api_key))
        if reply.status_code != 200:
            raise AuditError(_refusal_message(reply.status_code, reply.text, base_url))
        counts.append(int(reply.json().get("usage", {}).get("prompt_tokens", 0)))
    return counts[0] != counts[1]


def answer_jobs(
    probes: Sequence[Probe], conditions: Sequence[Condition], model: str, sampling: Sampling
) -> list[Job]:
    """One chat-completions job per probe x condition."""
    jobs = []
    for condition in conditions:
        for probe in probes:
            messages: list[dict[str, str]] = []
            if condition.arm.system_prompt:
                messages.append({"role": "system", "content": condition.arm.system_prompt})
            messages.append({"role": "user", "content": probe.prompt})
            body = {
                "model": model,
                "messages": messages,
                "temperature": sampling.temperature,
                "seed": sampling.seed,
                "max_tokens": sampling.max_tokens_thinking if condition.thinking else sampling.max_tokens,
                "chat_template_kwargs": {"enable_thinking": condition.thinking},
            }
            meta = {
                "arm": condition.arm.name,
                "thinking": condition.thinking,
                "model": model,
                "topic": probe.topic,
                "template": probe.template,
                "kind": probe.kind,
                "control": probe.control,
                "country": probe.country,
                "language": probe.language,
                "country_name": probe.country_name,
                "prompt": probe.prompt,
            }
            jobs.append(Job((probe.id, condition.id), condition.arm.api_key, body, meta))
    return jobs


def split_reasoning(message: dict[str, Any]) -> tuple[str, str]:
    """``(answer, reasoning)`` from a chat message: vLLM's reasoning parser puts the reasoning in
    ``reasoning_content`` (or ``reasoning``); without a parser it stays inline as ``<think>...</think>``."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
    if not reasoning and "</think>" in content:
        head, _, content = content.partition("</think>")
        reasoning = head.replace("<think>", "", 1)
    return content.strip(), reasoning.strip()


@dataclass
class RunStats:
    asked: int = 0
    skipped: int = 0
    errors: int = 0
    seconds: float = 0.0


async def _post_with_retries(
    client: httpx.AsyncClient,
    url: str,
    job: Job,
    retries: int,
    backoff_s: float,
    jitter: random.Random,
) -> dict[str, Any]:
    """POST ``job.body``; retry what may pass on a second try; return the response JSON.

    Raises:
        AuditError: 401/403/404 (no point asking the other probes either).
        RuntimeError: another non-retryable answer, or retries exhausted (recorded as this job's error).
    """
    last = ""
    for attempt in range(retries + 1):
        wait = min(backoff_s * 2**attempt, 60.0) * (0.5 + jitter.random())
        try:
            reply = await client.post(url, json=job.body, headers=_headers(job.api_key))
        except httpx.TransportError as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if reply.status_code == 200:
                return dict(reply.json())
            if reply.status_code in (401, 403, 404):
                raise AuditError(_refusal_message(reply.status_code, reply.text, url))
            last = f"HTTP {reply.status_code}: {reply.text[:300]}"
            if reply.status_code not in RETRY_STATUS:
                raise RuntimeError(last)
            retry_after = reply.headers.get("retry-after", "")
            if retry_after.isdigit():
                wait = max(wait, float(retry_after))
        if attempt < retries:
            logger.debug("%s: %s; retry %d in %.1f s", job.key, last, attempt + 1, wait)
            await asyncio.sleep(wait)
    raise RuntimeError(f"gave up after {retries + 1} tries: {last}")


def chat_record(job: Job, response: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The JSONL record of an answered chat completion."""
    choice = (response.get("choices") or [{}])[0]
    answer, reasoning = split_reasoning(choice.get("message") or {})
    return {
        **job.meta,
        "probe": job.key[0],
        "condition": job.key[1],
        "answer": answer,
        "reasoning": reasoning,
        "finish_reason": choice.get("finish_reason"),
        "usage": response.get("usage") or {},
        "seconds": round(seconds, 3),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }


async def run_jobs(
    jobs: Sequence[Job],
    out: Path,
    base_url: str,
    *,
    path: str = "/chat/completions",
    concurrency: int = 4,
    retries: int = 4,
    backoff_s: float = 1.0,
    timeout_s: float = 600.0,
    to_record: Callable[[Job, dict[str, Any], float], dict[str, Any]] = chat_record,
    description: str = "asking",
    client: httpx.AsyncClient | None = None,
) -> RunStats:
    """Run every job whose key has no answer in ``out`` yet, appending one record per job.

    Args:
        jobs: the requests; their keys must be unique.
        out: the JSONL file (created, or resumed).
        base_url: ``.../v1``.
        path: the route under ``base_url``.
        concurrency: requests in flight at once.
        retries / backoff_s: retry count and first backoff (doubling, with jitter, capped at 60 s).
        timeout_s: per request (a non-streamed answer is silent until complete).
        to_record: builds the record from a job and its JSON response.
        description: the progress bar's label.
        client: an existing client (tests); one is made and closed otherwise.

    Returns:
        How many were asked, skipped as already answered, and failed (failures are recorded with an
        ``error`` field and asked again by the next run).

    Raises:
        AuditError: the endpoint refused the key or the route (the run stops; answers so far are kept).
    """
    stats = RunStats()
    done = answered(out)
    todo = [job for job in jobs if job.key not in done]
    stats.skipped = len(jobs) - len(todo)
    if not todo:
        return stats
    start = time.monotonic()
    semaphore = asyncio.Semaphore(concurrency)
    jitter = random.Random()
    url = base_url + path
    own = client is None
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    client = client or httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0), limits=limits)
    try:
        with Appender(out) as appender, tqdm(total=len(todo), desc=description, unit="req") as bar:

            async def one(job: Job) -> None:
                async with semaphore:
                    begun = time.monotonic()
                    try:
                        response = await _post_with_retries(client, url, job, retries, backoff_s, jitter)
                        record = to_record(job, response, time.monotonic() - begun)
                    except RuntimeError as exc:
                        stats.errors += 1
                        record = {**job.meta, "probe": job.key[0], "condition": job.key[1], "error": str(exc)}
                        logger.warning("%s %s: %s", *job.key, exc)
                    appender.write(record)
                    stats.asked += 1
                    bar.update(1)

            tasks = [asyncio.create_task(one(job)) for job in todo]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
    finally:
        if own:
            await client.aclose()
    stats.seconds = time.monotonic() - start
    return stats
