"""Every shipped config loads into its schema; rendering gives the flags vLLM itself accepts; where vLLM
listens (a private Unix socket by default, loopback TCP on request)."""

from __future__ import annotations

import os
import shlex
import socket
import stat
from pathlib import Path

import pytest

from serve.cli import main as kit
from serve.config import available, load_model_config, load_profile
from serve.configfile import ConfigError
from serve.render import render
from serve.supervisor import StartupError, gateway_env, prepare_uds, vllm_address

ROOT = Path(__file__).resolve().parent.parent
SOCKET = ROOT / "state" / "run" / "vllm.sock"
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
def test_every_profile_loads_listens_on_the_kit_s_socket_and_sets_max_num_seqs(name):
    resolved = load_profile(ROOT, name)
    argv = render(resolved).argv
    assert argv[argv.index("--uds") + 1] == str(SOCKET)
    assert "--host" not in argv and "--port" not in argv  # vLLM ignores them with --uds
    assert int(argv[argv.index("--max-num-seqs") + 1]) >= 1
    # The TCP option still binds loopback only.
    argv = render(load_profile(ROOT, name, {"vllm.uds": None})).argv
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and "--uds" not in argv


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
        f"--uds {SOCKET}",
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
    lora = {"vllm.enable_lora": True, "vllm.max_lora_rank": 8, "vllm.lora_modules": {"a": "/tmp/a"}}
    for name in PROFILES:
        argv = render(load_profile(ROOT, name, lora)).argv
        args = parser.parse_args(argv[argv.index("serve") + 1 :])
        assert args.max_num_seqs >= 1 and args.uds == str(SOCKET) and args.host is None, name
        assert args.lora_modules and args.enable_lora, name
        argv = render(load_profile(ROOT, name, {**lora, "vllm.port": 8001})).argv
        args = parser.parse_args(argv[argv.index("serve") + 1 :])
        assert (args.uds, args.host, args.port) == (None, "127.0.0.1", 8001), name


def test_tcp_is_an_explicit_option_and_port_overrides_keep_meaning_tcp():
    vllm = load_profile(ROOT, "cpu-demo", {"vllm.uds": None}).profile.vllm
    assert (vllm.uds, vllm.host, vllm.port) == (None, "127.0.0.1", 8000)
    assert vllm_address(vllm) == ("http://127.0.0.1:8000", None)
    assert load_profile(ROOT, "cpu-demo", {"vllm.port": 8001}).profile.vllm.uds is None
    assert load_profile(ROOT, "cpu-demo", {"vllm.host": "::1"}).profile.vllm.uds is None
    assert vllm_address(load_profile(ROOT, "cpu-demo", {"vllm.host": "::1"}).profile.vllm)[0] == (
        "http://[::1]:8000"
    )
    with pytest.raises(ConfigError, match="vLLM ignores --host/--port with --uds"):
        load_profile(ROOT, "cpu-demo", {"vllm.uds": "/tmp/x.sock", "vllm.port": 8001})
    with pytest.raises(ConfigError, match="set by the profile's own fields"):
        load_profile(ROOT, "cpu-demo", {"vllm.extra_args": ["--uds=/tmp/y.sock"]})


def test_the_socket_path_resolves_against_the_kit_root_and_a_long_one_is_refused(tmp_path):
    vllm = load_profile(ROOT, "cpu-demo", {"vllm.uds": "state/run/other.sock"}).profile.vllm
    assert vllm.uds == ROOT / "state" / "run" / "other.sock" and vllm.uds.is_absolute()
    assert vllm_address(vllm) == ("http://localhost", vllm.uds)
    long_path = f"/tmp/{'x' * 100}/vllm.sock"  # 115 bytes; sun_path holds 107 and a NUL
    with pytest.raises(ConfigError) as caught:
        load_profile(ROOT, "cpu-demo", {"vllm.uds": long_path})
    assert long_path in str(caught.value) and "115 bytes" in str(caught.value)
    assert "shorter path" in caught.value.hint
    # The default socket under a deeply nested kit is refused the same way, before anything starts.
    deep = tmp_path / ("d" * 100)
    root = _write_profile(deep, (ROOT / "configs/serve/cpu-demo.yaml").read_text())
    with pytest.raises(ConfigError, match="Unix sockets allow 107"):
        load_profile(root, "bad")


def test_the_socket_folder_is_made_private_and_others_are_refused(tmp_path):
    old_umask = os.umask(0)  # the folder must come out 0700 whatever the umask
    try:
        prepare_uds(tmp_path / "run" / "vllm.sock")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o700
    open_folder = tmp_path / "open"
    open_folder.mkdir(mode=0o755)
    open_folder.chmod(0o755)
    with pytest.raises(StartupError, match=f"chmod 700 {open_folder}"):
        prepare_uds(open_folder / "vllm.sock")


def test_a_stale_socket_is_cleared_and_a_live_one_is_refused(tmp_path):
    path = tmp_path / "run" / "vllm.sock"
    prepare_uds(path)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        with pytest.raises(StartupError, match="already listens"):
            prepare_uds(path)
    assert path.is_socket()  # closed without unlinking, as a killed vLLM leaves it
    prepare_uds(path)
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(StartupError, match="not a socket"):
        prepare_uds(path)


def test_the_gateway_gets_the_socket(monkeypatch, tmp_path):
    from serve.gateway.settings import GatewaySettings

    env = gateway_env("http://localhost", 9, tmp_path / "k.sqlite", ["m"], upstream_uds=tmp_path / "v.sock")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KIT_GATEWAY_CONFIG", str(ROOT / "configs" / "gateway.yaml"))
    assert GatewaySettings().upstream_uds == tmp_path / "v.sock"
    # A TCP profile clears a socket that configs/gateway.yaml may name.
    tcp = gateway_env("http://127.0.0.1:1", 9, tmp_path / "k", ["m"])
    monkeypatch.setenv("KIT_GATEWAY_UPSTREAM_UDS", tcp["KIT_GATEWAY_UPSTREAM_UDS"])
    assert GatewaySettings().upstream_uds is None


def test_the_gateways_read_timeout_covers_the_longest_generation_a_profile_allows(root):
    from serve.supervisor import SLOWEST_DECODE_TOKENS_PER_S, upstream_read_timeout_s

    h200 = load_profile(root, "h200")
    assert h200.profile.vllm.max_model_len == 262144
    # 262,144 tokens at 10 tokens/s: a non-streamed answer is silent until complete.
    assert upstream_read_timeout_s(h200) == 262144 / SLOWEST_DECODE_TOKENS_PER_S
    assert upstream_read_timeout_s(load_profile(root, "cpu-demo")) == 3600.0  # the floor
    env = gateway_env("http://x", 9, Path("k"), ["m"], read_timeout_s=upstream_read_timeout_s(h200))
    assert float(env["KIT_GATEWAY_UPSTREAM_READ_TIMEOUT_S"]) > 7 * 3600


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
    out = capsys.readouterr().out
    assert "--port 8001" in out and "--uds" not in out


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
