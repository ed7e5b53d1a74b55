"""`kit up` (make up): vLLM on its Unix socket + a 2-worker gateway come up together and both stop on
SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import httpx
import pytest

from serve.gateway.keys import KeyStore
from serve.supervisor import free_port
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration


def test_up_serves_through_two_workers_and_stops_everything_on_sigterm(tmp_path):
    gateway_port = free_port(below_ephemeral=True)
    uds = tmp_path / "run" / "vllm.sock"  # not the kit's state/run/vllm.sock: another `make up` may hold it
    keys_db = tmp_path / "keys.sqlite"
    key = KeyStore(keys_db).create("up")
    env = {
        **os.environ,
        "KIT_GATEWAY_PORT": str(gateway_port),
        "KIT_GATEWAY_HOST": "127.0.0.1",
        "KIT_GATEWAY_KEYS_DB": str(keys_db),
        "KIT_GATEWAY_WORKERS": "2",
        "TMPDIR": str(tmp_path),
    }
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serve.cli",
            "--root",
            str(ROOT),
            "up",
            "cpu-qwen3_5-tiny",
            "--set",
            f"vllm.uds={uds}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    gateway = f"http://127.0.0.1:{gateway_port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert up.poll() is None, up.stdout.read() if up.stdout else ""
            assert time.monotonic() < deadline, "kit up was not ready in 300 s"
            try:
                if httpx.get(gateway + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        headers = {"authorization": f"Bearer {key}"}
        assert uds.is_socket() and stat.S_IMODE(uds.parent.stat().st_mode) == 0o700
        for i in range(4):  # spread over both workers, each reaching vLLM over the socket
            tagged = {**headers, "x-request-id": f"up-test-{gateway_port}-{i}"}
            models = httpx.get(gateway + "/v1/models", headers=tagged).json()
            assert [m["id"] for m in models["data"]] == ["kit/qwen3_5-tiny"]
        # Each worker pushes its counts every 0.25 s; /metrics adds up both workers.
        expected = 'kit_gateway_requests_total{route="/v1/models",status="200"} 4.0'
        deadline = time.monotonic() + 5
        while expected not in (metrics := httpx.get(gateway + "/metrics").text):
            assert time.monotonic() < deadline, metrics
            time.sleep(0.25)
    finally:
        up.send_signal(signal.SIGTERM)
        output, _ = up.communicate(timeout=60)
    assert up.returncode == 0, output
    assert "stopped vLLM and the gateway" in output
    # Every worker writes the JSON access log (uvicorn's workers do not inherit the parent's logging).
    log = (ROOT / "state" / "logs" / "gateway.log").read_text()
    lines = [json.loads(line) for line in log.splitlines() if f"up-test-{gateway_port}-" in line]
    assert len(lines) == 4 and all(entry["key"] == "up" and entry["status"] == 200 for entry in lines)
    assert key not in log
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{gateway_port}/health", timeout=2)
    assert not uds.exists(), "the socket file outlived vLLM"
