"""Real vLLM (CPU) + the real gateway, started once per test module."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serve.config import load_profile
from serve.gateway.keys import KeyStore
from serve.modeldir import not_ready_reason
from serve.supervisor import Stack, free_port, run_stack

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LiveStack:
    stack: Stack
    key: str
    keys_db: Path

    @property
    def gateway(self) -> str:
        return self.stack.gateway_url

    @property
    def vllm(self) -> str:
        return self.stack.vllm_url

    @property
    def model(self) -> str:
        return self.stack.served_model_name

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}"}


def vllm_gauge(vllm_url: str, name: str) -> float:
    """Sum of a vLLM Prometheus gauge (e.g. ``vllm:num_requests_running``) over its label sets."""
    text = httpx.get(vllm_url + "/metrics").text
    values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)]
    assert values, f"{name} not in vLLM's /metrics"
    return sum(values)


def start_live_stack(profile: str, tmp: Path, adapters: dict[str, Path] | None = None) -> Iterator[LiveStack]:
    overrides: dict[str, object] = {"vllm.port": free_port()}
    if adapters:
        overrides["vllm.lora_modules"] = {name: str(path) for name, path in adapters.items()}
    resolved = load_profile(ROOT, profile, overrides)
    reason = not_ready_reason(resolved)
    assert reason is None, f"{reason} (make test builds the models first)"
    keys_db = tmp / "keys.sqlite"
    key = KeyStore(keys_db).create("integration")
    with run_stack(resolved, keys_db=keys_db, log_dir=tmp / "logs", scratch=tmp / "scratch") as stack:
        yield LiveStack(stack, key, keys_db)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    yield from start_live_stack("cpu-demo", tmp_path_factory.mktemp("smollm2"))


def tiny_adapters(tmp: Path) -> dict[str, Path]:
    """A LoRA trained on the tiny qwen3_5 model (seconds), and a copy renamed to the causal-LM key prefix
    (the trap: vLLM loads it and changes nothing)."""
    from safetensors.torch import load_file, save_file

    from finetune.train import run

    good = tmp / "tiny-lora"
    run(ROOT, "qwen3_5-tiny_lora-cpu", ROOT / "tests" / "fixtures" / "data" / "good.jsonl", good)
    wrong = tmp / "tiny-lora-causal-lm-keys"
    shutil.copytree(good, wrong)
    weights = wrong / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k.replace("model.language_model.", "model."): v for k, v in tensors.items()}, str(weights))
    return {"tiny-lora": good, "tiny-lora-causal-lm-keys": wrong}


@pytest.fixture(scope="module")
def qwen3_5_tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    tmp = tmp_path_factory.mktemp("qwen3_5")
    yield from start_live_stack("cpu-qwen3_5-tiny", tmp, tiny_adapters(tmp))
