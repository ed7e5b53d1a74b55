"""The Claude Code serving path without starting anything: the 65,536-position tiny model's build option,
the ``cpu-claude-code`` profile, and the check that keeps ``max_model_len`` inside the model's rotary table
(vLLM's engine crashed on the first request past it)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from serve.config import load_profile, model_positions
from serve.configfile import ConfigError
from serve.render import render

ROOT = Path(__file__).resolve().parent.parent


def builder() -> ModuleType:
    """``scripts/build_tiny_qwen3_5.py`` as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "build_tiny_qwen3_5", ROOT / "scripts" / "build_tiny_qwen3_5.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kit_root(tmp_path: Path, positions: int, rope: dict[str, object] | None = None) -> Path:
    """A kit folder with the shipped configs and a built-looking ``qwen3_5-tiny-64k`` of ``positions``."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    model_dir = tmp_path / "models" / "qwen3_5-tiny-64k"
    model_dir.mkdir(parents=True)
    text = {"max_position_embeddings": positions, **({"rope_parameters": rope} if rope else {})}
    (model_dir / "config.json").write_text(json.dumps({"text_config": text}))
    return tmp_path


def test_the_profile_serves_65536_tokens_of_the_64k_model_with_schema_bound_tool_calls():
    resolved = load_profile(ROOT, "cpu-claude-code")
    assert resolved.model.name == "qwen3_5-tiny-64k" and resolved.profile.vllm.max_model_len == 65536
    assert resolved.model.served_model_name == "kit/qwen3_5-tiny-64k"
    argv = render(resolved, cpuinfo="").argv
    assert argv[argv.index("--max-model-len") + 1] == "65536"
    assert argv[argv.index("--tool-strict-level") + 1] == "parameter"
    assert argv[argv.index("--tool-call-parser") + 1] == "qwen3_coder" and "--enable-auto-tool-choice" in argv
    model = yaml.safe_load((ROOT / "configs" / "models" / "qwen3_5-tiny-64k.yaml").read_text())
    assert "--max-position-embeddings 65536" in model["build_command"]
    assert model["local_dir"] in model["build_command"]


def test_max_model_len_past_the_model_s_positions_is_refused_before_vllm_starts(tmp_path):
    root = kit_root(tmp_path, 4096)
    with pytest.raises(ConfigError) as caught:
        load_profile(root, "cpu-claude-code")
    problem = caught.value.problems[0]
    assert "cpu-claude-code.yaml: vllm.max_model_len: 65536 is longer than the 4096 positions" in problem
    assert "qwen3_5-tiny-64k/config.json" in problem
    assert (
        "--set vllm.max_model_len=4096" in caught.value.hint
        and "make models-claude-code" in caught.value.hint
    )
    assert (
        load_profile(root, "cpu-claude-code", {"vllm.max_model_len": 4096}).profile.vllm.max_model_len == 4096
    )


def test_positions_follow_vllm_s_rule_for_rope_scaling(tmp_path):
    # A linear factor stretches the table (vLLM multiplies); YaRN's length is already in the field.
    linear = kit_root(tmp_path / "linear", 16384, {"rope_type": "linear", "factor": 4.0})
    folder = linear / "models" / "qwen3_5-tiny-64k"
    assert model_positions(folder) == (65536, folder / "config.json")
    assert load_profile(linear, "cpu-claude-code").profile.vllm.max_model_len == 65536
    yarn = kit_root(tmp_path / "yarn", 16384, {"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match="65536 is longer than the 16384 positions"):
        load_profile(yarn, "cpu-claude-code")
    # Not built yet: nothing to check against, so loading (and `kit validate` on a fresh clone) works.
    shutil.rmtree(linear / "models")
    assert model_positions(folder) is None
    assert load_profile(linear, "cpu-claude-code").profile.vllm.max_model_len == 65536


def test_the_build_option_changes_only_the_positions_and_the_inputs_hash():
    build = builder()
    long = build.text_config_for(65536)
    assert {k: v for k, v in long.items() if k != "max_position_embeddings"} == {
        k: v for k, v in build.TEXT_CONFIG.items() if k != "max_position_embeddings"
    }
    assert build.TEXT_CONFIG["max_position_embeddings"] == 4096  # the default model is unchanged
    template = build.read_template()
    default_hash = build.inputs_manifest(template)["inputs_sha256"]
    assert build.inputs_manifest(template, build.text_config_for(4096))["inputs_sha256"] == default_hash
    assert build.inputs_manifest(template, long)["inputs_sha256"] != default_hash
    assert build.parse_args(["--max-position-embeddings", "65536"]).max_position_embeddings == 65536
    with pytest.raises(SystemExit):
        build.parse_args(["--max-position-embeddings", "300000"])


def test_make_models_claude_code_builds_the_64k_model():
    plan = subprocess.run(
        ["make", "-n", "models-claude-code"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    model = yaml.safe_load((ROOT / "configs" / "models" / "qwen3_5-tiny-64k.yaml").read_text())
    assert model["build_command"].removeprefix("python ") in plan  # the same build, run by the venv's python
