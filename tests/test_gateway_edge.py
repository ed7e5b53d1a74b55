"""The gateway's edge for browsers and reverse proxies: CORS only for the origins configured (none by
default), and the ledger's ``client_ip`` taken from ``X-Forwarded-For`` only when the peer is a trusted
proxy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve.gateway.keys import KeyStore
from tests.gateway_process import gateway_process
from tests.test_gateway_policy import chat_body, fake_upstream
from tests.test_ledger import read_ledger

ORIGIN = "https://app.example.com"
PREFLIGHT = {
    "origin": ORIGIN,
    "access-control-request-method": "POST",
    "access-control-request-headers": "authorization",
}


@pytest.fixture
def upstream_url(serve_aiohttp: Callable[..., Any]) -> str:
    app, _ = fake_upstream()
    return str(serve_aiohttp(app).url)


def test_without_configured_origins_the_gateway_sends_no_cors_headers(upstream_url, gateway_factory):
    gateway, key = gateway_factory(upstream_url)
    preflight = httpx.options(gateway.url + "/v1/chat/completions", headers=PREFLIGHT, timeout=10)
    assert "access-control-allow-origin" not in preflight.headers
    reply = httpx.post(
        gateway.url + "/v1/chat/completions",
        json=chat_body(),
        headers={"authorization": f"Bearer {key}", "origin": ORIGIN},
        timeout=10,
    )
    assert reply.status_code == 200 and "access-control-allow-origin" not in reply.headers


def test_configured_origins_get_preflights_and_headers_and_others_do_not(upstream_url, gateway_factory):
    gateway, key = gateway_factory(upstream_url, cors_allow_origins=[ORIGIN])
    preflight = httpx.options(gateway.url + "/v1/chat/completions", headers=PREFLIGHT, timeout=10)
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    stranger = httpx.options(
        gateway.url + "/v1/chat/completions",
        headers={**PREFLIGHT, "origin": "https://evil.example"},
        timeout=10,
    )
    assert stranger.status_code == 400 and "access-control-allow-origin" not in stranger.headers
    reply = httpx.post(
        gateway.url + "/v1/chat/completions",
        json=chat_body(),
        headers={"authorization": f"Bearer {key}", "origin": ORIGIN},
        timeout=10,
    )
    assert reply.status_code == 200
    assert reply.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in reply.headers["access-control-expose-headers"]
    # Keys still apply to cross-origin calls.
    refused = httpx.post(gateway.url + "/v1/chat/completions", json=chat_body(), headers={"origin": ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN


@pytest.mark.parametrize(("trusted", "expected"), [("127.0.0.1", "203.0.113.7"), ("10.9.9.9", "127.0.0.1")])
def test_the_ledgers_client_ip_believes_forwarded_for_only_from_a_trusted_proxy(
    tmp_path: Path, upstream_url: str, trusted: str, expected: str
) -> None:
    db = tmp_path / "gw.sqlite"
    key = KeyStore(db).create("tester")
    env = {"KIT_GATEWAY_KEYS_DB": str(db), "KIT_GATEWAY_TRUSTED_PROXIES": f'["{trusted}"]'}
    with gateway_process(tmp_path, upstream_url, env, workers=1) as gateway:
        reply = httpx.post(
            gateway.url + "/v1/chat/completions",
            json=chat_body(),
            headers={
                "authorization": f"Bearer {key}",
                "x-forwarded-for": "203.0.113.7",
                "x-request-id": "fwd-1",
            },
            timeout=10,
        )
        assert reply.status_code == 200
    rows = {row["request_id"]: row for row in read_ledger(f"sqlite:///{db}")}
    assert rows["fwd-1"]["client_ip"] == expected


def test_a_multi_worker_gateway_removes_its_metrics_folder_when_it_stops(tmp_path, down_upstream_url):
    # Prometheus's multiprocess mode needs a folder shared by the workers; `kit gateway` makes one under
    # TMPDIR and must not leave one behind per start.
    KeyStore(tmp_path / "gw.sqlite").create("metrics-folder")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with gateway_process(tmp_path, down_upstream_url, {"TMPDIR": str(scratch)}) as gateway:
        made = list(scratch.glob("kit-gateway-metrics-*"))
        assert len(made) == 1 and made[0].is_dir(), made
        assert httpx.get(gateway.url + "/healthz").status_code == 200
    assert not made[0].exists()
