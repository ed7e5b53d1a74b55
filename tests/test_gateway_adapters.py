"""Runtime LoRA load/unload through the gateway's admin endpoint, against a stand-in for vLLM's
``/v1/load_lora_adapter`` routes: admin keys only, plain names under ``adapters_dir`` only, the kit's
adapter checks before vLLM sees anything, and a load vLLM does not apply is an error, never a silent
success. The adapter is a real one trained on the tiny Qwen3.6-architecture model (6 steps)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from finetune.train import run
from tests.test_gateway_policy import add_key

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "qwen3_5-tiny"
SERVED = "kit/qwen3_5-tiny"


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("adapters")
    info = run(
        ROOT,
        "qwen3_5-tiny_lora-cpu",
        ROOT / "tests" / "fixtures" / "data" / "good.jsonl",
        folder / "tiny-support",
    )
    assert info is not None
    wrong = folder / "wrong-base"
    shutil.copytree(folder / "tiny-support", wrong)
    config = json.loads((wrong / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "other/model"})
    )
    shutil.copytree(folder / "tiny-support", folder / "forgotten")
    return folder


def fake_vllm() -> tuple[web.Application, list[dict[str, Any]]]:
    """Lists the base and the loaded adapters; ``forgotten`` is accepted but never listed."""
    loaded: set[str] = set()
    calls: list[dict[str, Any]] = []

    async def models(request: web.Request) -> web.Response:
        data = [{"id": SERVED, "object": "model", "root": "/srv/base", "parent": None}]
        data += [{"id": n, "object": "model", "root": f"/srv/{n}", "parent": SERVED} for n in sorted(loaded)]
        return web.json_response({"object": "list", "data": data})

    async def load(request: web.Request) -> web.Response:
        body = await request.json()
        calls.append({"path": request.path, **body})
        if body["lora_name"] != "forgotten":
            loaded.add(body["lora_name"])
        return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    async def unload(request: web.Request) -> web.Response:
        body = await request.json()
        calls.append({"path": request.path, **body})
        if body["lora_name"] not in loaded:
            return web.json_response({"error": {"message": "not found"}}, status=404)
        loaded.discard(body["lora_name"])
        return web.Response(text="Success")

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/load_lora_adapter", load)
    app.router.add_post("/v1/unload_lora_adapter", unload)
    return app, calls


@pytest.fixture
def setup(
    adapters_dir: Path, serve_aiohttp: Callable[..., Any], gateway_factory: Callable[..., Any]
) -> tuple[Any, list[dict[str, Any]]]:
    app, calls = fake_vllm()
    upstream = serve_aiohttp(app)
    gateway, _ = gateway_factory(
        upstream.url,
        key_cache_ttl_s=0,
        adapters_dir=adapters_dir,
        base_model_dir=TINY,
        served_model_names=[SERVED],
        max_lora_rank=8,
        model_aliases={"gpt-4o": SERVED},
    )
    return gateway, calls


def _call(gateway: Any, key: str, action: str, name: Any) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/adapters/{action}",
        json={"name": name},
        headers={"authorization": f"Bearer {key}"},
        timeout=60,
    )


def test_only_admin_keys_load_adapters(setup):
    gateway, calls = setup
    user = add_key(gateway, "user")
    reply = _call(gateway, user, "load", "tiny-support")
    assert reply.status_code == 403 and reply.json()["error"]["code"] == "not_admin"
    assert calls == []


@pytest.mark.parametrize("name", ["../tiny-support", "a/b", "/etc", "..", "", None, 7, "x" * 65, ".hidden"])
def test_anything_but_a_plain_name_is_refused_before_vllm(setup, name):
    gateway, calls = setup
    admin = add_key(gateway, "root", admin=True)
    reply = _call(gateway, admin, "load", name)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_adapter_name", reply.text
    assert calls == []


def test_missing_folders_served_names_and_failed_checks_never_reach_vllm(setup):
    gateway, calls = setup
    admin = add_key(gateway, "root", admin=True)
    missing = _call(gateway, admin, "load", "nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "adapter_not_found"
    assert _call(gateway, admin, "load", "gpt-4o").status_code == 409  # an alias of the base
    wrong = _call(gateway, admin, "load", "wrong-base")
    assert wrong.status_code == 400 and "profile serves" in wrong.json()["error"]["message"]
    assert calls == []


def test_a_checked_adapter_loads_shows_in_models_and_unloads(setup, adapters_dir):
    gateway, calls = setup
    admin = add_key(gateway, "root", admin=True)
    reply = _call(gateway, admin, "load", "tiny-support")
    assert reply.status_code == 200, reply.text
    assert reply.json()["loaded"] is True and any("fingerprint" in c for c in reply.json()["checks"])
    assert calls[-1] == {
        "path": "/v1/load_lora_adapter",
        "lora_name": "tiny-support",
        "lora_path": str((adapters_dir / "tiny-support").resolve()),
    }
    team = add_key(gateway, "team", models=("tiny-*",))
    listing = httpx.get(gateway.url + "/v1/models", headers={"authorization": f"Bearer {team}"}, timeout=10)
    assert [m["id"] for m in listing.json()["data"]] == ["tiny-support"]
    assert _call(gateway, admin, "unload", "tiny-support").status_code == 200
    again = _call(gateway, admin, "unload", "tiny-support")
    assert again.status_code == 404 and again.json()["error"]["code"] == "adapter_not_loaded"


def test_a_load_vllm_accepts_but_does_not_apply_is_an_error(setup):
    gateway, _ = setup
    admin = add_key(gateway, "root", admin=True)
    reply = _call(gateway, admin, "load", "forgotten")
    assert reply.status_code == 502 and reply.json()["error"]["code"] == "not_listed"


def test_without_an_adapters_dir_runtime_adapters_are_off(serve_aiohttp, gateway_factory):
    app, calls = fake_vllm()
    gateway, _ = gateway_factory(serve_aiohttp(app).url, key_cache_ttl_s=0)
    admin = add_key(gateway, "root", admin=True)
    reply = _call(gateway, admin, "load", "tiny-support")
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "adapters_off"
    assert calls == []
