"""The gateway as deploy/k8s/gateway.yaml runs it, two replicas on one real PostgreSQL (tests/postgres.py).

Each replica is a separate ``python -m serve.cli gateway`` process with the manifest's environment (its
literal ``value`` entries; host, port and upstream made local) and ``KIT_GATEWAY_DATABASE_URL`` as the
Secret would supply it, in front of a fake vLLM in this process. Nothing is shared between the two but the
database, as between two pods: a per-key limit holds across both, every request of either lands in the
one usage ledger, and a key revoked once is refused by both. tests/test_gateway_limits.py covers two
workers of one gateway on PostgreSQL; this is the Kubernetes switch, two gateways.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import create_engine, func, select

from serve.gateway.keys import KeyPolicy, KeyStore
from serve.gateway.store import LedgerRow
from tests.conftest import ThreadedAiohttp
from tests.gateway_process import GatewayProcess, start_gateway_process
from tests.postgres import new_database
from tests.test_gateway_limits import FakeVllm, minute_requests

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
LOCAL = {"KIT_GATEWAY_HOST", "KIT_GATEWAY_PORT", "KIT_GATEWAY_UPSTREAM_URL", "KIT_GATEWAY_WORKERS"}
KEYS = {"rpm": KeyPolicy(rpm=5), "ledger": KeyPolicy(), "revoked": KeyPolicy()}


def manifest_env() -> dict[str, str]:
    """The gateway container's literal environment in deploy/k8s/gateway.yaml, less what is local here."""
    docs = list(yaml.safe_load_all((ROOT / "deploy/k8s/gateway.yaml").read_text()))
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e and e["name"] not in LOCAL}


@dataclass
class Replicas:
    gateways: list[GatewayProcess]
    keys: dict[str, str]
    database: str
    fake: FakeVllm


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[Replicas]:
    fake = FakeVllm()
    upstream = ThreadedAiohttp(fake.app()).start()
    gateways: list[GatewayProcess] = []
    try:
        with new_database(postgres_url, "replicas") as url:
            try:
                store = KeyStore(url)
                keys = {key: store.create(key, policy) for key, policy in KEYS.items()}
                store.engine.dispose()
                env = {
                    **manifest_env(),
                    "KIT_GATEWAY_DATABASE_URL": url,  # what the Secret kit-gateway-db supplies
                    "KIT_GATEWAY_KEY_CACHE_TTL_S": "0.5",
                }
                for index in range(2):
                    folder = tmp_path_factory.mktemp(f"replica{index}")  # nothing shared but the database
                    gateways.append(start_gateway_process(folder, upstream.url, env, workers=1))
                yield Replicas(gateways, keys, url, fake)
            finally:
                for gateway in gateways:
                    gateway.stop()
    finally:
        fake.release.set()
        upstream.stop()


def post(gateway: GatewayProcess, key: str) -> int:
    body = {"model": "Qwen/Qwen3.6-27B", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    reply = httpx.post(gateway.url + CHAT, json=body, headers={"authorization": f"Bearer {key}"}, timeout=60)
    return reply.status_code


def test_a_rate_limit_holds_across_the_two_replicas(replicas: Replicas) -> None:
    left = 60 - time.time() % 60
    if left < 20:  # a burst across a minute boundary would rightly admit up to twice the limit
        time.sleep(left + 0.5)
    fake = replicas.fake
    fake.release.set()
    fake.calls = 0
    targets = [replicas.gateways[i % 2] for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        statuses = sorted(pool.map(lambda g: post(g, replicas.keys["rpm"]), targets))
    assert statuses == [200] * 5 + [429] * 7, statuses
    assert fake.calls == 5
    assert minute_requests(replicas.database, "rpm") == 5
    # Spent for this minute on either replica.
    assert {post(g, replicas.keys["rpm"]) for g in replicas.gateways} == {429}


def test_both_replicas_write_one_usage_ledger(replicas: Replicas) -> None:
    replicas.fake.release.set()
    sent = {0: 3, 1: 4}
    for index, count in sent.items():
        for _ in range(count):
            assert post(replicas.gateways[index], replicas.keys["ledger"]) == 200
    engine = create_engine(replicas.database)
    try:
        deadline = time.monotonic() + 30  # rows are flushed in batches (ledger_flush_interval_s)
        while True:
            with engine.connect() as connection:
                rows = connection.execute(
                    select(func.count(), func.sum(LedgerRow.completion_tokens)).where(
                        LedgerRow.key_name == "ledger"
                    )
                ).one()
            if rows[0] >= 7 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert tuple(rows) == (7, 7 * 4)
    finally:
        engine.dispose()


def test_a_key_revoked_once_is_refused_by_both_replicas(replicas: Replicas) -> None:
    replicas.fake.release.set()
    key = replicas.keys["revoked"]
    assert [post(g, key) for g in replicas.gateways] == [200, 200]
    store = KeyStore(replicas.database)  # as `kit key revoke` does, from anywhere that reaches the database
    store.revoke("revoked")
    store.engine.dispose()
    deadline = time.monotonic() + 15  # each replica reloads its key cache every key_cache_ttl_s (0.5 s)
    statuses = [0, 0]
    while time.monotonic() < deadline:
        statuses = [post(g, key) for g in replicas.gateways]
        if statuses == [401, 401]:
            break
        time.sleep(0.2)
    assert statuses == [401, 401]
