"""The gateway worker's garbage-collector policy (serve/gateway/gc_policy.py): uvicorn's factory freezes
what the worker built and raises the young-generation threshold; ``gc_gen0_threshold: null`` leaves
Python's defaults; a gateway built with ``create_app`` (inside another process) leaves its collector alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from serve.gateway.keys import KeyStore

PROBE = """
import gc, json
from serve.gateway.app import {factory}
app = {call}
print(json.dumps({{"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count()}}))
"""


def _probe(tmp_path: Path, config: str, factory: str, call: str) -> dict[str, object]:
    keys_db = tmp_path / "keys.sqlite"
    KeyStore(keys_db).create("gc")
    (tmp_path / "gateway.yaml").write_text(f"keys_db: {keys_db}\n{config}")
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(factory=factory, call=call)],
        env={"KIT_GATEWAY_CONFIG": str(tmp_path / "gateway.yaml"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_the_worker_factory_freezes_start_up_objects_and_raises_the_young_threshold(tmp_path):
    tuned = _probe(tmp_path, "", "create_app_from_env", "create_app_from_env()")
    assert tuned["threshold"] == [20_000, 10, 10]
    assert tuned["frozen"] > 10_000  # the modules and the app, out of every later collection


def test_a_null_threshold_leaves_python_s_collector_as_it_is(tmp_path):
    default = _probe(tmp_path, "gc_gen0_threshold: null\n", "create_app_from_env", "create_app_from_env()")
    assert default == {"threshold": [700, 10, 10], "frozen": 0}


def test_create_app_inside_another_process_leaves_its_collector_alone(tmp_path):
    embedded = _probe(
        tmp_path,
        "",
        "create_app\nfrom serve.gateway.settings import GatewaySettings",
        "create_app(GatewaySettings())",
    )
    assert embedded == {"threshold": [700, 10, 10], "frozen": 0}
