"""What ``kit up`` hands the gateway and vLLM from a profile and its model config: aliases (Claude Code's
model ids), the non-thinking sampling preset, runtime adapters (and vLLM's runtime-LoRA switch), and
vLLM's ``--shutdown-timeout``; each checked all the way to the gateway's parsed settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.config import ConfigError, load_profile
from serve.gateway.settings import GatewaySettings
from serve.render import render
from serve.supervisor import gateway_env, gateway_model_env

ROOT = Path(__file__).resolve().parent.parent


def _settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> GatewaySettings:
    config = tmp_path / "gateway.yaml"
    config.write_text("log_level: INFO\n")
    monkeypatch.setenv("KIT_GATEWAY_CONFIG", str(config))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return GatewaySettings()


def test_the_27b_profile_gives_the_gateway_claude_aliases_and_the_non_thinking_preset(monkeypatch, tmp_path):
    resolved = load_profile(ROOT, "h200")
    extra = gateway_model_env(resolved, ROOT)
    assert extra["model_aliases"] == {"claude-*": "Qwen/Qwen3.6-27B"}
    assert extra["runtime_adapters"] is None
    env = gateway_env("http://127.0.0.1:8000", 8080, tmp_path / "k.sqlite", ["Qwen/Qwen3.6-27B"], **extra)
    settings = _settings(env, monkeypatch, tmp_path)
    assert settings.model_aliases == {"claude-*": "Qwen/Qwen3.6-27B"}
    # The model card's non-thinking preset (configs/models/qwen3.6-27b.yaml sampling.non_thinking).
    assert settings.non_thinking_sampling["Qwen/Qwen3.6-27B"] == {
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "presence_penalty": 1.5,
    }
    assert settings.adapters_dir is None


def test_runtime_adapters_turn_on_vllms_switch_and_the_gateways_admin_routes(monkeypatch, tmp_path):
    resolved = load_profile(ROOT, "h200-lora", {"adapters_dir": "adapters"})
    assert render(resolved, cpuinfo="").env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    extra = gateway_model_env(resolved, ROOT)
    env = gateway_env("http://127.0.0.1:8000", 8080, tmp_path / "k.sqlite", ["Qwen/Qwen3.6-27B"], **extra)
    settings = _settings(env, monkeypatch, tmp_path)
    assert settings.adapters_dir == ROOT / "adapters"
    assert settings.base_model_dir == resolved.model_dir and settings.max_lora_rank == 64
    # Without the switch nothing is set for vLLM either.
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in render(load_profile(ROOT, "h200-lora"), cpuinfo="").env


def test_runtime_adapters_without_lora_on_are_refused_before_anything_starts():
    with pytest.raises(ConfigError, match="enable_lora"):
        load_profile(ROOT, "h200", {"adapters_dir": "adapters"})


def test_vllms_shutdown_timeout_is_rendered_as_its_flag():
    argv = render(load_profile(ROOT, "h200", {"vllm.shutdown_timeout": 30}), cpuinfo="").argv
    assert argv[argv.index("--shutdown-timeout") + 1] == "30"
    assert "--shutdown-timeout" not in render(load_profile(ROOT, "h200"), cpuinfo="").argv
