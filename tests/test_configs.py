"""Every shipped config loads into its schema; rendering gives the flags vLLM itself accepts."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from serve.cli import main as kit
from serve.config import available, load_model_config, load_profile
from serve.configfile import ConfigError
from serve.render import render

ROOT = Path(__file__).resolve().parent.parent
PROFILES = available(ROOT / "configs", "serve")
MODELS = available(ROOT / "configs", "models")


def test_the_issue_s_profiles_and_models_ship():
    assert {"h200", "h100x2", "h100-fp8", "cpu-demo", "cpu-qwen3_5-tiny"} <= set(PROFILES)
    assert {"qwen3.6-27b", "smollm2-135m-instruct", "qwen3_5-tiny"} <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_config_loads(name):
    model = load_model_config(ROOT / "configs", name)
    assert model.name == name


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_loads_binds_loopback_and_sets_max_num_seqs(name):
    resolved = load_profile(ROOT, name)
    argv = render(resolved).argv
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert int(argv[argv.index("--max-num-seqs") + 1]) >= 1


def test_h200_renders_the_qwen36_command():
    command = render(load_profile(ROOT, "h200"))
    assert command.argv[:3] == ["vllm", "serve", str(ROOT / "models/qwen3.6-27b")]
    line = command.shell()
    for expected in (
        "--served-model-name Qwen/Qwen3.6-27B",
        "--dtype bfloat16",
        "--max-num-seqs 64",
        "--reasoning-parser qwen3",
        "--enable-auto-tool-choice",
        "--tool-call-parser qwen3_coder",
        """--speculative-config '{"method":"mtp","num_speculative_tokens":1}'""",
        "--host 127.0.0.1",
        "HF_HUB_OFFLINE=1",
        "VLLM_NO_USAGE_STATS=1",
    ):
        assert expected in line
    assert "--enforce-eager" not in line
    assert render(load_profile(ROOT, "h100x2")).argv.count("--tensor-parallel-size") == 1


def test_cpu_profiles_use_the_launcher_and_eager_mode():
    argv = render(load_profile(ROOT, "cpu-qwen3_5-tiny"), python="py").argv
    assert argv[:5] == ["py", "-m", "serve.vllm_launcher", "serve", str(ROOT / "models/qwen3_5-tiny")]
    assert "--enforce-eager" in argv and "--language-model-only" in argv


def test_vllm_s_own_parser_accepts_every_rendered_profile():
    """Catches misspelt or removed flags against the installed vLLM (field names == vLLM's names)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    for name in PROFILES:
        argv = render(
            load_profile(
                ROOT,
                name,
                {"vllm.enable_lora": True, "vllm.max_lora_rank": 8, "vllm.lora_modules": {"a": "/tmp/a"}},
            )
        ).argv
        args = parser.parse_args(argv[argv.index("serve") + 1 :])
        assert args.max_num_seqs >= 1 and args.host == "127.0.0.1", name
        assert args.lora_modules and args.enable_lora, name


def _write_profile(tmp_path: Path, body: str) -> Path:
    (tmp_path / "configs" / "serve").mkdir(parents=True)
    (tmp_path / "configs" / "models").mkdir(parents=True)
    for model in MODELS:
        src = ROOT / "configs" / "models" / f"{model}.yaml"
        (tmp_path / "configs" / "models" / src.name).write_text(src.read_text())
    (tmp_path / "configs" / "serve" / "bad.yaml").write_text(body)
    return tmp_path


def test_problems_are_all_reported_with_file_and_line(tmp_path):
    root = _write_profile(
        tmp_path,
        "model: smollm2-135m-instruct\nvllm_build: cpu\nhardware: x\nvllm:\n"
        "  host: 0.0.0.0\n  max_num_seqs: 0\n  max_num_seq: 4\n  enforce_eager: true\n"
        "  kv_cache_memory_bytes: 1000\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_profile(root, "bad")
    problems = "\n".join(caught.value.problems)
    path = root / "configs" / "serve" / "bad.yaml"
    assert f"{path}:5: vllm.host" in problems and "loopback" in problems
    assert f"{path}:6: vllm.max_num_seqs" in problems
    assert f"{path}:7: vllm.max_num_seq" in problems and "Extra inputs" in problems


def test_cpu_profile_without_eager_mode_is_refused(tmp_path):
    root = _write_profile(
        tmp_path,
        "model: smollm2-135m-instruct\nvllm_build: cpu\nhardware: x\n"
        "vllm:\n  max_num_seqs: 2\n  kv_cache_memory_bytes: 1000\n",
    )
    with pytest.raises(ConfigError, match="enforce_eager"):
        load_profile(root, "bad")


def test_lora_modules_need_enable_lora_and_a_rank(tmp_path):
    root = _write_profile(
        tmp_path,
        "model: qwen3.6-27b\nvllm_build: cuda\nhardware: x\n"
        "vllm:\n  max_num_seqs: 2\n  lora_modules: {a: /x}\n",
    )
    with pytest.raises(ConfigError, match="enable_lora"):
        load_profile(root, "bad")


def test_unknown_model_and_bad_yaml_are_clear(tmp_path):
    root = _write_profile(tmp_path, "model: nope\nvllm_build: cuda\nhardware: x\nvllm: {max_num_seqs: 1}\n")
    with pytest.raises(ConfigError) as caught:
        load_profile(root, "bad")
    assert "qwen3.6-27b" in caught.value.hint
    (root / "configs" / "serve" / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_profile(root, "bad")


def test_cli_dry_run_prints_the_command_and_errors_exit_non_zero(capsys):
    assert kit(["--root", str(ROOT), "serve", "h200", "--dry-run"]) == 0
    out = capsys.readouterr().out.strip()
    assert shlex.split(out)[3:6] == ["vllm", "serve", str(ROOT / "models/qwen3.6-27b")]
    assert kit(["--root", str(ROOT), "serve", "nope", "--dry-run"]) == 2
    assert "available profiles" in capsys.readouterr().err
    assert kit(["--root", str(ROOT), "serve", "h200", "--set", "vllm.port=8001", "--dry-run"]) == 0
    assert "--port 8001" in capsys.readouterr().out


def test_serving_a_missing_model_says_how_to_get_it(tmp_path, capsys):
    root = _write_profile(tmp_path, (ROOT / "configs/serve/h200.yaml").read_text())
    assert kit(["--root", str(root), "serve", "bad"]) == 2
    assert "make download MODEL=qwen3.6-27b" in capsys.readouterr().err


def test_validate_checks_every_shipped_config(capsys):
    assert kit(["--root", str(ROOT), "validate"]) == 0
    assert f"{len(MODELS)} models, {len(PROFILES)} profiles" in capsys.readouterr().out


@pytest.mark.parametrize("name", available(ROOT / "configs", "finetune"))
def test_every_recipe_loads_with_its_base_and_serve_profile(name):
    from finetune.recipe import load_recipe

    recipe, model, _ = load_recipe(ROOT, name)
    profile = load_profile(ROOT, recipe.serve_profile)
    assert profile.model.name == model.name, "a recipe's adapter is served on its own base"
    assert profile.profile.vllm.enable_lora and recipe.lora.r <= profile.profile.vllm.max_lora_rank
    if recipe.chat_template is not None:
        assert (ROOT / recipe.chat_template).is_file()
        assert "generation" in (ROOT / recipe.chat_template).read_text()


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "zero3"])
def test_accelerate_topologies_load_in_accelerate(name):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.mixed_precision == "bf16" and config.num_processes > 1
    expected = {"ddp": "MULTI_GPU", "fsdp2": "FSDP", "zero3": "DEEPSPEED"}[name]
    assert config.distributed_type.value == expected
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
