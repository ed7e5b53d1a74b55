"""Graceful shutdown of the real gateway process (SIGTERM, as systemd, Docker and ``make stop`` send it):
requests that finish within ``shutdown_timeout_s`` are answered in full; past it a stream ends with an
error event (never a silent cut, which a client would read as a complete answer), an unanswered request
gets 503 with ``Retry-After``, vLLM is let go of both, and each has a ledger row with outcome
``shutdown``.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from serve.gateway.keys import KeyStore
from tests.gateway_process import start_gateway_process
from tests.polling import wait_for
from tests.test_gateway_policy import fake_upstream
from tests.test_ledger import read_ledger


def _in_thread(job: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = job()
        except Exception as exc:  # reported by the assertions below
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_sigterm_lets_short_requests_finish_and_ends_the_rest_with_an_error(
    tmp_path: Path, serve_aiohttp: Callable[..., Any]
) -> None:
    app, seen = fake_upstream()
    upstream = serve_aiohttp(app)
    db = tmp_path / "gw.sqlite"
    key = KeyStore(db).create("tester")
    env = {"KIT_GATEWAY_KEYS_DB": str(db), "KIT_GATEWAY_SHUTDOWN_TIMEOUT_S": "2"}
    gateway = start_gateway_process(tmp_path, upstream.url, env, workers=1)
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    url = gateway.url + "/v1/chat/completions"

    def body(mode: str, stream: bool) -> str:
        return json.dumps(
            {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": stream, "mode": mode}
        )

    def stream_lines() -> list[str]:
        headers_with_id = {**headers, "x-request-id": "shutdown-stream"}
        with httpx.stream(
            "POST", url, content=body("slow", True), headers=headers_with_id, timeout=60
        ) as reply:
            return [line for line in reply.iter_lines() if line]

    def whole(mode: str, request_id: str) -> httpx.Response:
        return httpx.post(
            url, content=body(mode, False), headers={**headers, "x-request-id": request_id}, timeout=60
        )

    try:
        streaming, stream_out = _in_thread(stream_lines)
        waiting, waiting_out = _in_thread(lambda: whole("slow", "shutdown-whole"))
        deadline = time.monotonic() + 20
        while len(seen.bodies("/v1/chat/completions")) < 2:
            assert time.monotonic() < deadline, gateway.log_tail()
            time.sleep(0.05)
        short, short_out = _in_thread(lambda: whole("delay", "shutdown-short"))  # 0.5 s: inside the grace
        time.sleep(0.2)
        stopped_at = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        for thread in (streaming, waiting, short):
            thread.join(30)
        gateway.process.wait(30)
        took = time.monotonic() - stopped_at
    finally:
        gateway.stop()

    assert "error" not in short_out, short_out
    assert short_out["value"].status_code == 200 and short_out["value"].json()["choices"]
    lines = stream_out["value"]
    assert lines[0].startswith("data: ") and "Hel" in lines[0]
    last = json.loads(lines[-1].removeprefix("data: "))
    assert "shutting down" in last["error"]["message"], lines  # not a silent cut, not a [DONE]
    assert "data: [DONE]" not in lines
    refused = waiting_out["value"]
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert refused.json()["error"]["code"] == "shutting_down"
    assert 1.5 < took < 20, took  # it waited for the grace period, then ended the rest
    # vLLM was let go of both: the fake notices a closed connection on its next 20 ms poll, which may come
    # after the gateway's exit on a loaded machine.
    let_go = {"shutdown-stream", "shutdown-whole"}
    wait_for(lambda: let_go <= set(seen.left), 5, f"vLLM not let go of both {sorted(let_go)} in 5 s", 0.02)
    rows = {row["request_id"]: row for row in read_ledger(f"sqlite:///{db}")}
    assert rows["shutdown-short"]["outcome"] == "ok"
    assert (
        rows["shutdown-stream"]["outcome"] == "shutdown" and rows["shutdown-stream"]["completion_tokens"] == 1
    )
    assert rows["shutdown-whole"]["outcome"] == "shutdown" and rows["shutdown-whole"]["status"] == 503
