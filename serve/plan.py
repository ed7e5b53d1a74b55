"""Memory planner: does a serve profile fit its GPUs, and how much KV cache is left? (``make plan``)

Works before anything is downloaded, from the model YAML's ``architecture_numbers`` (copied from the
checkpoint's ``config.json``) and the profile; checks those numbers against the downloaded ``config.json``
when there is one. Every figure is per GPU unless it says otherwise; bytes are exact integers, GiB is
2**30 bytes.

Where the formulas come from (vLLM 0.32, the installed ``vllm`` package):

- KV cache: only full-attention layers keep per-token K and V (``FullAttentionSpec``:
  ``2 x block_size x num_kv_heads x head_size x dtype bytes``, vllm/v1/kv_cache_interface.py). KV heads
  are split over tensor-parallel ranks (at least one per rank: ``ModelConfig.get_num_kv_heads``). The MTP
  draft layer is one more full-attention layer with its own KV.
- Gated DeltaNet state, per running sequence and linear-attention layer
  (vllm/model_executor/layers/mamba/mamba_utils.py ``MambaStateShapeCalculator.gated_delta_net_state_shape``,
  called by vllm/model_executor/models/qwen3_5.py ``get_mamba_state_shape_from_config``):
  conv state ``(2 x linear_num_key_heads x linear_key_head_dim + linear_num_value_heads x
  linear_value_head_dim) / tp`` x ``(linear_conv_kernel_dim - 1 + num_speculative_tokens)`` in the model
  dtype, and recurrent state ``linear_num_value_heads / tp x linear_value_head_dim x linear_key_head_dim``
  in ``mamba_ssm_dtype`` (``MambaStateDtypeCalculator.gated_delta_net_state_dtype``; Qwen3.5/3.6 take
  ``mamba_ssm_dtype`` from config.json: vllm/model_executor/models/config.py
  ``Qwen3_5ForConditionalGenerationConfig``).
- Hybrid paging: vLLM makes one attention block at least as large as one layer's state and pads the state
  page to it (vllm/platforms/interface.py ``_align_hybrid_block_size``), so a state costs a whole number
  of attention pages; block sizes are multiples of :data:`KERNEL_BLOCK_ALIGN` tokens.
- State pages per running sequence and layer: ``1 + num_speculative_tokens``, or ``2 +
  num_speculative_tokens`` in vLLM's mamba "align" cache mode, which vLLM turns on for Qwen3.5/3.6 when
  prefix caching is on (its default; log line "Mamba cache mode is set to 'align' ... when prefix caching
  is enabled"): vllm/v1/kv_cache_interface.py ``MambaSpec.max_memory_usage_bytes``, with
  ``num_speculative_blocks = num_speculative_tokens`` (vllm/model_executor/layers/mamba/abstract.py).
- vLLM needs room for one ``max_model_len`` request at start (vllm/v1/core/kv_cache_utils.py
  ``check_enough_kv_cache_memory``). The planner also wants a state block for every one of
  ``max_num_seqs`` sequences: with vLLM's default 1024 a same-architecture 27B aborted start-up on a 96 GB
  card (shared/reference/qwen3.6-27b.md, "Serving with vLLM").
- Headroom for activations, CUDA graphs and the runtime is an estimate (:data:`DEFAULT_RUNTIME_HEADROOM_GIB`,
  :func:`activation_bytes`); vLLM measures the real one in its profile run at start.
"""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve.config import ArchitectureNumbers, ResolvedProfile
from serve.configfile import ConfigError

GIB = 1024**3
MIB = 1024**2
KIB = 1024

DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
"""vLLM's default ``--gpu-memory-utilization`` (vllm/config/cache.py ``CacheConfig``)."""

DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
"""vLLM's default ``--max-num-batched-tokens`` for the API server on >= 70 GiB GPUs other than A100
(vllm/engine/arg_utils.py ``get_batch_defaults``: H100 and H200)."""

DEFAULT_RUNTIME_HEADROOM_GIB = 2.0
"""ASSUMPTION, not measured here (no GPU was lent): per-GPU memory outside the weights, KV cache and
activations: CUDA context, cuBLAS/NCCL workspaces and captured CUDA graphs. vLLM counts these inside
``gpu_memory_utilization``; 2 GiB is a round figure for an H100/H200. A profile's ``plan.headroom_gib``
replaces it."""

KERNEL_BLOCK_ALIGN = 16
"""Attention block sizes are multiples of 16 tokens: the FlashAttention backend's supported kernel block
sizes are ``MultipleOf(16)`` (vllm/v1/attention/backends/flash_attn.py), used by
``_align_hybrid_block_size``."""

FP8_BLOCK = 128
"""FP8 checkpoints of Qwen store one float32 scale per 128 x 128 weight block (``weight_block_size`` in
their ``quantization_config``)."""

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}
_KV_DTYPE_BYTES = {"fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class GpuMemory:
    """The GPUs a profile runs on."""

    bytes_per_gpu: int
    """``memory.total`` of the smallest GPU used."""
    count: int
    source: str
    """``nvidia-smi`` or the profile field it came from."""


@dataclass(frozen=True)
class ParamCounts:
    """Parameters by part, from :class:`ArchitectureNumbers` (counts, not bytes)."""

    linear: int
    """Projection matrices of the language model's layers (what an FP8 checkpoint stores in fp8)."""
    other: int
    """Embeddings, output head, norms, conv filters, gates of the language model (kept bf16 in FP8)."""
    mtp_linear: int
    mtp_other: int
    vision: int

    @property
    def language_model(self) -> int:
        return self.linear + self.other

    @property
    def mtp(self) -> int:
        return self.mtp_linear + self.mtp_other


def param_counts(arch: ArchitectureNumbers) -> ParamCounts:
    """Count parameters from the config's shapes (the Qwen3.5/3.6 layer layout of transformers'
    ``modeling_qwen3_5.py``; a plain transformer when there are no linear-attention layers).

    Full attention: ``q_proj`` (x2 with ``attn_output_gate``), ``k_proj``, ``v_proj``, ``o_proj``, q/k norms.
    Gated DeltaNet: ``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``, ``out_proj``; conv1d,
    ``A_log``, ``dt_bias``, norm. MLP: gate, up, down. MTP layer: one full-attention layer, an ``fc``
    (2 x hidden -> hidden) and three norms; it shares the embeddings and output head
    (``mtp_use_dedicated_embeddings: false``; vLLM shares them: vllm/v1/spec_decode/llm_base_proposer.py
    ``_maybe_share_embeddings``). For Qwen3.6-27B the total with the vision tower matches the 55,586,107,940
    checkpoint bytes (see ``vision_params`` in configs/models/qwen3.6-27b.yaml).
    """
    h = arch.hidden_size
    q_width = arch.num_attention_heads * arch.head_dim
    attn_linear = (
        h * q_width * (2 if arch.attn_output_gate else 1) + 2 * h * arch.num_key_value_heads * arch.head_dim
    )
    attn_linear += q_width * h
    attn_other = 2 * arch.head_dim if arch.attn_output_gate else 0  # q_norm, k_norm (Qwen3 family)
    mlp_linear = 3 * h * arch.intermediate_size
    norms = 2 * h
    linear = arch.num_full_attention_layers * (attn_linear + mlp_linear)
    other = arch.num_full_attention_layers * (attn_other + norms) + arch.num_linear_attention_layers * norms
    if arch.num_linear_attention_layers:
        nk, nv = arch.linear_num_key_heads or 0, arch.linear_num_value_heads or 0
        dk, dv = arch.linear_key_head_dim or 0, arch.linear_value_head_dim or 0
        conv_dim = 2 * nk * dk + nv * dv
        gdn_linear = h * conv_dim + h * nv * dv + 2 * h * nv + nv * dv * h
        gdn_other = conv_dim * (arch.linear_conv_kernel_dim or 0) + 2 * nv + dv
        linear += arch.num_linear_attention_layers * (gdn_linear + mlp_linear)
        other += arch.num_linear_attention_layers * gdn_other
    embeddings = arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2)
    other += embeddings + h  # + the final norm
    mtp_linear = arch.mtp_num_hidden_layers * (attn_linear + mlp_linear + 2 * h * h)
    mtp_other = arch.mtp_num_hidden_layers * (attn_other + norms + 3 * h)
    return ParamCounts(linear, other, mtp_linear, mtp_other, arch.vision_params)


def dtype_bytes(name: str) -> int:
    """Bytes per element of a vLLM dtype name (``bfloat16``, ``float16``, ``float32``, ``fp8``)."""
    return _DTYPE_BYTES[name]


@dataclass(frozen=True)
class WeightBytes:
    """Weight bytes per GPU, by part."""

    language_model: int
    vision: int
    """0 with ``language_model_only``."""
    mtp: int
    """0 without MTP speculative decoding."""
    vision_skipped: int
    """What ``language_model_only`` frees (or freed)."""

    @property
    def total(self) -> int:
        return self.language_model + self.vision + self.mtp


def weight_bytes(
    arch: ArchitectureNumbers, dtype: str, language_model_only: bool, mtp: bool, shards: int
) -> WeightBytes:
    """Bytes of the weights vLLM loads, per GPU.

    Args:
        arch: the model's shapes.
        dtype: the serving dtype (``bfloat16``...): everything not stored in fp8 is held in it.
        language_model_only: the vision tower is not loaded (``--language-model-only``).
        mtp: the MTP layer is loaded as the speculative draft.
        shards: tensor x pipeline parallel ranks; weights are assumed to split evenly (norms are
            replicated and the vision tower is not always sharded: a slight underestimate).
    """
    counts = param_counts(arch)
    full = dtype_bytes(dtype)
    if arch.weight_dtype == "fp8":
        # fp8 projections + one float32 scale per 128x128 block; the rest (embeddings, head, norms, vision
        # tower) in the serving dtype, as Qwen's FP8 checkpoints keep them (an assumption for the vision
        # tower and the small GDN gates, which are counted as fp8 here).
        def fp8(n: int) -> int:
            return n + math.ceil(n / (FP8_BLOCK * FP8_BLOCK)) * 4

        lm = fp8(counts.linear) + counts.other * full
        mtp_bytes = fp8(counts.mtp_linear) + counts.mtp_other * full
    else:
        lm = counts.language_model * full
        mtp_bytes = counts.mtp * full
    vision = counts.vision * full
    return WeightBytes(
        language_model=lm // shards,
        vision=0 if language_model_only else vision // shards,
        mtp=mtp_bytes // shards if mtp else 0,
        vision_skipped=vision // shards,
    )


def kv_heads_per_gpu(arch: ArchitectureNumbers, tp: int) -> int:
    """KV heads each tensor-parallel rank holds: split, or replicated when there are fewer heads than
    ranks (vllm/config/model.py ``get_num_kv_heads``: ``max(1, total // tp)``)."""
    return max(1, arch.num_key_value_heads // tp)


def kv_bytes_per_token_per_layer(arch: ArchitectureNumbers, tp: int, kv_bytes: int) -> int:
    """K and V of one token in one full-attention layer on one GPU: ``2 x kv_heads x head_dim x bytes``."""
    return 2 * kv_heads_per_gpu(arch, tp) * arch.head_dim * kv_bytes


def gdn_state_bytes_per_layer(
    arch: ArchitectureNumbers, tp: int, model_dtype: str, num_spec: int
) -> tuple[int, int]:
    """One Gated DeltaNet layer's state for one running sequence on one GPU: ``(conv, recurrent)`` bytes.

    Shapes from vLLM's ``gated_delta_net_state_shape`` (module docstring): conv ``conv_dim / tp x
    (kernel - 1 + num_spec)`` in the model dtype, recurrent ``num_v_heads / tp x v_dim x k_dim`` in
    ``mamba_ssm_dtype``.
    """
    if not arch.num_linear_attention_layers:
        return 0, 0
    nk, nv = arch.linear_num_key_heads or 0, arch.linear_num_value_heads or 0
    dk, dv = arch.linear_key_head_dim or 0, arch.linear_value_head_dim or 0
    conv_dim = 2 * nk * dk + nv * dv
    conv = conv_dim // tp * ((arch.linear_conv_kernel_dim or 1) - 1 + num_spec) * dtype_bytes(model_dtype)
    recurrent = nv // tp * dv * dk * dtype_bytes(arch.mamba_ssm_dtype or model_dtype)
    return conv, recurrent


@dataclass(frozen=True)
class Plan:
    """What a profile's memory holds, per GPU, and whether vLLM can start with it."""

    profile: str
    model: str
    hardware: str
    build: str
    gpu: GpuMemory | None
    utilization: float
    budget: int
    """Memory vLLM may use per GPU (``memory.total x gpu_memory_utilization``); 0 on cpu profiles."""
    weights: WeightBytes
    weight_dtype: str
    headroom_runtime: int
    headroom_activations: int
    pool: int
    """KV cache + state pool per GPU: ``kv_cache_memory_bytes`` when set, else budget - weights - headroom."""
    kv_layers: int
    """Full-attention layers holding KV on one GPU (+1 for the MTP draft)."""
    kv_per_token: int
    """KV bytes per token per GPU, all full-attention layers."""
    kv_dtype: str
    mtp_layers: int
    """Of ``kv_layers``, the MTP draft's (0 without MTP speculative decoding)."""
    state_layers: int
    state_conv: int
    state_recurrent: int
    state_per_seq: int
    """Bytes per running sequence on one GPU, all linear-attention layers, padded to attention pages."""
    state_pages: int
    """State pages each running sequence holds per linear-attention layer (see the module docstring)."""
    block_tokens: int
    """Attention block size that holds one layer's state (0 for models without linear attention)."""
    max_model_len: int
    max_num_seqs: int
    kv_tokens: int
    """Tokens of KV the pool holds after a state block for each of ``max_num_seqs`` sequences."""
    context_at_max_num_seqs: int
    full_length_seqs: int
    """``max_model_len`` sequences that fit at once (KV + state each), capped by ``max_num_seqs``."""
    problems: tuple[str, ...] = ()
    suggestions: tuple[str, ...] = ()
    savings: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def fits(self) -> bool:
        return not self.problems

    def report(self) -> str:
        """The plan as the lines ``kit plan`` prints."""
        g = _gib
        lines = [f"memory plan: profile {self.profile} ({self.hardware}), model {self.model}"]
        if self.gpu is not None:
            lines.append(
                f"  GPU memory      {g(self.gpu.bytes_per_gpu)} x {self.gpu.count} ({self.gpu.source}); "
                f"x gpu_memory_utilization {self.utilization} = {g(self.budget)} per GPU for vLLM"
            )
            w = self.weights
            parts = [f"language model {g(w.language_model)}"]
            parts.append(
                f"vision tower {g(w.vision)}"
                if w.vision
                else f"vision tower skipped (-{g(w.vision_skipped)})"
            )
            if w.mtp:
                parts.append(f"MTP draft {g(w.mtp)}")
            lines.append(f"  weights         {g(w.total)} per GPU ({self.weight_dtype}): {', '.join(parts)}")
            lines.append(
                f"  headroom        {g(self.headroom_runtime + self.headroom_activations)} per GPU: "
                f"runtime + CUDA graphs {g(self.headroom_runtime)} (assumption), activations + logits "
                f"{g(self.headroom_activations)} (estimate)"
            )
        per = " per GPU" if self.gpu is not None else " (vllm.kv_cache_memory_bytes)"
        lines.append(f"  KV cache pool   {g(self.pool)}{per}")
        layers = f"{self.kv_layers - self.mtp_layers} full-attention layers"
        if self.mtp_layers:
            layers += f" + {self.mtp_layers} MTP draft layer"
        per = " per GPU" if self.gpu is not None else ""
        lines.append(f"  KV per token    {_kib(self.kv_per_token)}{per} ({layers}, {self.kv_dtype})")
        if self.state_layers:
            lines.append(
                f"  GDN state       {_mib(self.state_per_seq)} per running sequence "
                f"({self.state_layers} layers x {self.state_pages} pages x (conv {_kib(self.state_conv)} + "
                f"recurrent {_mib(self.state_recurrent)}) padded to {self.block_tokens} tokens of KV); "
                f"x max_num_seqs {self.max_num_seqs} = "
                f"{g(self.state_per_seq * self.max_num_seqs)}"
            )
        lines.append(f"  => KV tokens total: {self.kv_tokens:,}")
        lines.append(
            f"     max context at max_num_seqs {self.max_num_seqs}: "
            f"{self.context_at_max_num_seqs:,} tokens each"
        )
        lines.append(
            f"     concurrent full-length ({self.max_model_len:,}-token) sequences: {self.full_length_seqs}"
        )
        lines += [f"  {s}" for s in self.savings]
        lines += [f"  note: {n}" for n in self.notes]
        if self.fits:
            lines.append("  fits: yes")
        else:
            lines.append("  fits: NO")
            lines += [f"    - {p}" for p in self.problems]
            if self.suggestions:
                lines.append("  nearest settings that fit:")
                lines += [f"    {s}" for s in self.suggestions]
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def _kib(n: int) -> str:
    return f"{n / KIB:g} KiB"


def query_nvidia_smi() -> list[int] | None:
    """``memory.total`` of every GPU ``nvidia-smi`` lists, in bytes; None where it is absent or fails."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        values = [int(float(line.strip())) * MIB for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return values or None


def gpu_memory(resolved: ResolvedProfile, smi: list[int] | None) -> GpuMemory:
    """The GPUs the profile will run on: from ``nvidia-smi`` when it answered, else the profile's
    ``gpu_memory_gib``.

    Raises:
        ConfigError: neither is available, or ``nvidia-smi`` lists fewer GPUs than the profile needs.
    """
    profile = resolved.profile
    need = profile.vllm.tensor_parallel_size * profile.vllm.pipeline_parallel_size
    if smi is not None:
        if len(smi) < need:
            raise ConfigError(
                [
                    f"{resolved.path}: vllm.tensor_parallel_size x pipeline_parallel_size needs {need} GPUs; "
                    f"nvidia-smi lists {len(smi)}"
                ],
                hint="use a profile for this many GPUs, or --set vllm.tensor_parallel_size=N",
            )
        return GpuMemory(min(smi[:need]), need, "nvidia-smi")
    if profile.gpu_memory_gib is None:
        raise ConfigError(
            [
                f"{resolved.path}: gpu_memory_gib: not set, and nvidia-smi is not available to measure "
                "the GPUs"
            ],
            hint="add gpu_memory_gib (each GPU's memory.total in GiB, e.g. 79.6 for an 80 GB H100) to the "
            "profile, or --set gpu_memory_gib=79.6",
        )
    return GpuMemory(int(profile.gpu_memory_gib * GIB), need, "profile gpu_memory_gib")


def _model_dtype(resolved: ResolvedProfile, arch: ArchitectureNumbers) -> str:
    dtype = resolved.profile.vllm.dtype
    if dtype in {"auto", "auto-cpu"}:
        # auto: the checkpoint's dtype; fp8 checkpoints compute in bf16. auto-cpu resolves to bf16 for
        # the Qwen3.6 family (cpu_requires_bfloat16) and float32 or bf16 otherwise: plan for the larger.
        if dtype == "auto-cpu" and not resolved.model.cpu_requires_bfloat16:
            return "float32"
        return "bfloat16" if arch.weight_dtype == "fp8" else arch.weight_dtype
    return dtype


def _kv_dtype(resolved: ResolvedProfile, model_dtype: str) -> str:
    kv = resolved.profile.vllm.kv_cache_dtype or "auto"
    if kv == "auto":
        return model_dtype
    if kv not in _KV_DTYPE_BYTES:
        raise ConfigError(
            [f"{resolved.path}: vllm.kv_cache_dtype: {kv!r} is not one the planner knows"],
            hint=f"use auto or one of {', '.join(_KV_DTYPE_BYTES)} (or --no-plan-check)",
        )
    return kv


def _num_spec(resolved: ResolvedProfile) -> tuple[bool, int]:
    """``(MTP draft on, num_speculative_tokens)`` from the profile's ``speculative_config``."""
    spec = resolved.profile.vllm.speculative_config or {}
    mtp = "mtp" in str(spec.get("method", ""))  # mtp, qwen3_next_mtp, qwen3_5_mtp
    return mtp, int(spec.get("num_speculative_tokens") or 0)


def activation_bytes(
    arch: ArchitectureNumbers, batched_tokens: int, seqs: int, spec: int, tp: int, act: int
) -> int:
    """ESTIMATE of the forward pass's peak activations per GPU (vLLM measures the real peak at start).

    The largest tensors of one layer's forward for ``batched_tokens`` tokens: the MLP's gate+up output
    and its activated half (``3 x intermediate_size / tp`` values per token), plus float32 logits for
    every sequence's sampled and drafted tokens (``seqs x (1 + spec) x vocab / tp x 4`` bytes).
    """
    mlp = batched_tokens * 3 * arch.intermediate_size // tp * act
    logits = seqs * (1 + spec) * arch.vocab_size // tp * 4
    return mlp + logits


def plan(resolved: ResolvedProfile, smi: list[int] | None = None) -> Plan:
    """Plan the memory of a resolved profile.

    Args:
        resolved: the profile and its model config (``load_profile``).
        smi: each GPU's ``memory.total`` in bytes (``query_nvidia_smi()``); None to use the profile's
            ``gpu_memory_gib``. Ignored for cpu profiles, whose KV space is set in the profile.

    Returns:
        The plan; ``plan.fits`` is False with ``problems`` and ``suggestions`` when vLLM cannot start.

    Raises:
        ConfigError: the model config has no ``architecture_numbers``, or GPU memory is unknown.
    """
    model = resolved.model
    arch = model.architecture_numbers
    if arch is None:
        raise ConfigError(
            [
                f"configs/models/{model.name}.yaml: architecture_numbers: missing; the memory planner "
                "needs them"
            ],
            hint="copy them from the checkpoint's config.json (see configs/models/qwen3.6-27b.yaml), or skip "
            "the planner with --no-plan-check",
        )
    profile = resolved.profile
    vllm = profile.vllm
    tp, pp = vllm.tensor_parallel_size, vllm.pipeline_parallel_size
    model_dtype = _model_dtype(resolved, arch)
    kv_dtype = _kv_dtype(resolved, model_dtype)
    mtp, num_spec = _num_spec(resolved)
    mtp_layers = arch.mtp_num_hidden_layers if mtp else 0
    max_len = vllm.max_model_len or arch.max_position_embeddings
    seqs = vllm.max_num_seqs
    cuda = profile.vllm_build == "cuda"

    kv_layer = kv_bytes_per_token_per_layer(arch, tp, _KV_DTYPE_BYTES[kv_dtype])
    kv_layers = math.ceil(arch.num_full_attention_layers / pp) + mtp_layers
    kv_per_token = kv_layers * kv_layer
    state_layers = math.ceil(arch.num_linear_attention_layers / pp)
    conv, recurrent = gdn_state_bytes_per_layer(arch, tp, model_dtype, num_spec)
    # Prefix caching is vLLM's default (None) for this model family; off only when the profile says false.
    align = vllm.enable_prefix_caching is not False
    state_pages = (2 if align else 1) + num_spec
    block_tokens = 0
    state_per_seq = 0
    if state_layers and kv_layer:
        block_tokens = KERNEL_BLOCK_ALIGN * math.ceil((conv + recurrent) / (KERNEL_BLOCK_ALIGN * kv_layer))
        state_per_seq = state_layers * state_pages * block_tokens * kv_layer

    weights = weight_bytes(arch, model_dtype, vllm.language_model_only, mtp_layers > 0, tp * pp)
    gpu: GpuMemory | None = None
    utilization = vllm.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
    budget = runtime = activations = 0
    problems: list[str] = []
    suggestions: list[str] = []
    notes: list[str] = []
    if cuda:
        gpu = gpu_memory(resolved, smi)
        budget = int(gpu.bytes_per_gpu * utilization)
        headroom_gib = profile.plan.headroom_gib
        runtime = int((DEFAULT_RUNTIME_HEADROOM_GIB if headroom_gib is None else headroom_gib) * GIB)
        batched = vllm.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS
        activations = activation_bytes(arch, batched, seqs, num_spec, tp, dtype_bytes(model_dtype))
    if vllm.kv_cache_memory_bytes is not None:
        pool = vllm.kv_cache_memory_bytes
        notes.append(
            "KV cache pool set by vllm.kv_cache_memory_bytes (gpu_memory_utilization does not size it)"
        )
    elif not cuda and "VLLM_CPU_KVCACHE_SPACE" in profile.env:
        pool = int(float(profile.env["VLLM_CPU_KVCACHE_SPACE"]) * GIB)
    else:
        pool = budget - weights.total - runtime - activations

    def kv_tokens_for(n_seqs: int, pool_bytes: int = pool, per_token: int = kv_per_token) -> int:
        return max(0, (pool_bytes - n_seqs * state_per_seq) // per_token)

    kv_tokens = kv_tokens_for(seqs)
    # vLLM gives a request whole attention blocks (cdiv(max_model_len, block_size)), as its
    # "Maximum concurrency" figure counts them (vllm/v1/core/kv_cache_utils.py).
    seq_kv = (math.ceil(max_len / block_tokens) * block_tokens if block_tokens else max_len) * kv_per_token
    full_len = min(seqs, max(0, pool // (seq_kv + state_per_seq)))
    context = min(max_len, kv_tokens // seqs)

    if cuda and budget - weights.total - runtime - activations <= 0 and vllm.kv_cache_memory_bytes is None:
        problems.append(
            f"weights ({_gib(weights.total)}) + headroom ({_gib(runtime + activations)}) need more than the "
            f"{_gib(budget)} vLLM may use per GPU"
        )
    elif (
        cuda
        and vllm.kv_cache_memory_bytes is not None
        and weights.total + pool + runtime + activations > budget
    ):
        problems.append(
            f"weights ({_gib(weights.total)}) + kv_cache_memory_bytes ({_gib(pool)}) + headroom "
            f"({_gib(runtime + activations)}) exceed the {_gib(budget)} vLLM may use per GPU"
        )
    need = seqs * state_per_seq + seq_kv
    if pool > 0 and need > pool:
        problems.append(
            f"max_num_seqs {seqs} x {_mib(state_per_seq)} of state + one {max_len:,}-token sequence's KV "
            f"({_gib(seq_kv)}) = {_gib(need)} > the {_gib(pool)} KV cache pool"
        )
    if problems:
        fixed = vllm.kv_cache_memory_bytes is not None or not cuda
        logits_per_seq = 0 if fixed else (1 + num_spec) * arch.vocab_size // tp * 4
        suggestions = _nearest(
            resolved,
            pool,
            max_len,
            seqs,
            kv_per_token,
            state_per_seq,
            kv_layers,
            kv_layer,
            logits_per_seq,
            seq_kv,
            block_tokens,
        )

    savings = _savings(
        resolved, arch, weights, pool, seqs, kv_per_token, state_per_seq, kv_dtype, kv_layers, kv_layer
    )
    return Plan(
        profile=resolved.name,
        model=model.name,
        hardware=profile.hardware,
        build=profile.vllm_build,
        gpu=gpu,
        utilization=utilization,
        budget=budget,
        weights=weights,
        weight_dtype=arch.weight_dtype if arch.weight_dtype == "fp8" else model_dtype,
        headroom_runtime=runtime,
        headroom_activations=activations,
        pool=pool,
        kv_layers=kv_layers,
        kv_per_token=kv_per_token,
        kv_dtype=kv_dtype,
        mtp_layers=mtp_layers,
        state_pages=state_pages if state_layers else 0,
        state_layers=state_layers,
        state_conv=conv,
        state_recurrent=recurrent,
        state_per_seq=state_per_seq,
        block_tokens=block_tokens,
        max_model_len=max_len,
        max_num_seqs=seqs,
        kv_tokens=kv_tokens,
        context_at_max_num_seqs=context,
        full_length_seqs=full_len,
        problems=tuple(problems),
        suggestions=tuple(suggestions),
        savings=tuple(savings),
        notes=tuple(notes),
    )


def _nearest(
    resolved: ResolvedProfile,
    pool: int,
    max_len: int,
    seqs: int,
    kv_per_token: int,
    state_per_seq: int,
    kv_layers: int,
    kv_layer: int,
    logits_per_seq: int,
    seq_kv: int,
    block_tokens: int,
) -> list[str]:
    """Settings close to the refused one that fit: the largest ``max_num_seqs`` at this context, the
    longest ``max_model_len`` at this ``max_num_seqs``, fp8 KV, or both lowered.

    ``logits_per_seq`` is the headroom each sequence adds (its float32 logits), so that a suggested
    ``max_num_seqs`` is planned with the pool it would leave.
    """
    vllm = resolved.profile.vllm
    out: list[str] = []
    if pool <= 0:
        out.append(
            "the weights do not leave room for a KV cache: serve the FP8 checkpoint (e.g. PROFILE=h100-fp8), "
            f"use more GPUs (--set vllm.tensor_parallel_size={vllm.tensor_parallel_size * 2}), set "
            "vllm.language_model_only=true, or raise vllm.gpu_memory_utilization"
        )
        return out
    pool0 = pool + seqs * logits_per_seq  # the pool with no sequence's logits taken out
    per_seq = state_per_seq + logits_per_seq
    fit_seqs = (pool0 - seq_kv) // per_seq if state_per_seq else 0
    if state_per_seq and fit_seqs >= 1:
        out.append(f"--set vllm.max_num_seqs={min(fit_seqs, seqs - 1)}   (keeps max_model_len {max_len:,})")
    fit_len = (pool - seqs * state_per_seq) // kv_per_token
    if block_tokens:  # whole attention blocks only
        fit_len = fit_len // block_tokens * block_tokens
    fit_len = fit_len // 1024 * 1024 if fit_len >= 2048 else fit_len // 16 * 16
    if fit_len >= 16:
        out.append(f"--set vllm.max_model_len={min(fit_len, max_len - 1)}   (keeps max_num_seqs {seqs})")
    if (vllm.kv_cache_dtype or "auto") == "auto" and kv_layer:
        half = kv_layers * (kv_layer // 2)
        # fp8 halves the bytes per token, so vLLM's pages hold twice the tokens
        blocks = 2 * block_tokens if block_tokens else 1
        if seqs * state_per_seq + math.ceil(max_len / blocks) * blocks * half <= pool:
            out.append("--set vllm.kv_cache_dtype=fp8   (keeps both; halves KV per token)")
    if not out and state_per_seq:
        # Neither knob alone fits: give the states at most half the pool and the context the rest.
        both = max(1, min(seqs, pool0 // 2 // per_seq))
        both_len = (pool0 - both * per_seq) // kv_per_token // 1024 * 1024
        if both_len >= 1024:
            out.append(f"--set vllm.max_num_seqs={both} --set vllm.max_model_len={both_len}   (both lowered)")
    if not out:
        out.append("no smaller max_num_seqs or max_model_len fits: use more GPUs or the FP8 checkpoint")
    return out


def _savings(
    resolved: ResolvedProfile,
    arch: ArchitectureNumbers,
    weights: WeightBytes,
    pool: int,
    seqs: int,
    kv_per_token: int,
    state_per_seq: int,
    kv_dtype: str,
    kv_layers: int,
    kv_layer: int,
) -> list[str]:
    """What ``language_model_only`` and an fp8 KV cache free (or freed) on this profile."""
    vllm = resolved.profile.vllm
    out: list[str] = []
    fixed_pool = vllm.kv_cache_memory_bytes is not None or resolved.profile.vllm_build != "cuda"
    if arch.vision_params:
        gain = weights.vision_skipped // kv_per_token if kv_per_token and not fixed_pool else 0
        more = f" = {gain:,} more KV tokens" if gain else ""
        if vllm.language_model_only:
            out.append(
                f"language_model_only: on, frees {_gib(weights.vision_skipped)} per GPU (vision tower){more}"
            )
        else:
            out.append(
                f"language_model_only: off; on would free {_gib(weights.vision_skipped)} per GPU{more} "
                "(--set vllm.language_model_only=true, text-only serving)"
            )
    if kv_layer and _KV_DTYPE_BYTES[kv_dtype] > 1:
        fp8_tokens = max(
            0, (pool - seqs * state_per_seq) // (kv_layers * (kv_layer // _KV_DTYPE_BYTES[kv_dtype]))
        )
        out.append(
            f"kv_cache_dtype: {kv_dtype}; fp8 would hold {fp8_tokens:,} KV tokens "
            f"(x{_KV_DTYPE_BYTES[kv_dtype]}; --set vllm.kv_cache_dtype=fp8, quality cost not measured here)"
        )
    elif kv_layer:
        bf16_tokens = max(0, (pool - seqs * state_per_seq) // (kv_layers * kv_layer * 2))
        out.append(f"kv_cache_dtype: {kv_dtype}, frees half the KV of bf16 ({bf16_tokens:,} tokens in bf16)")
    return out


# config.json fields compared with architecture_numbers (same names).
_CONFIG_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "attn_output_gate",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_conv_kernel_dim",
    "mamba_ssm_dtype",
    "mtp_num_hidden_layers",
    "max_position_embeddings",
)


def _config_values(config: dict[str, Any]) -> dict[str, Any]:
    """The values of ``config.json`` that :class:`ArchitectureNumbers` holds (text_config first)."""
    text = config.get("text_config") or config
    values: dict[str, Any] = {}
    for name in _CONFIG_FIELDS:
        if name in text:
            values[name] = text[name]
        elif name == "head_dim" and "hidden_size" in text and "num_attention_heads" in text:
            values[name] = text["hidden_size"] // text["num_attention_heads"]
    tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings"))
    if tie is not None:
        values["tie_word_embeddings"] = tie
    layer_types = text.get("layer_types")
    if isinstance(layer_types, list):
        values["num_full_attention_layers"] = sum(t == "full_attention" for t in layer_types)
        values["num_linear_attention_layers"] = sum(t == "linear_attention" for t in layer_types)
    elif "num_hidden_layers" in text:
        values["num_full_attention_layers"] = text["num_hidden_layers"]
        values["num_linear_attention_layers"] = 0
    quant = config.get("quantization_config") or text.get("quantization_config") or {}
    if quant.get("quant_method") == "fp8":
        values["weight_dtype"] = "fp8"
    else:
        dtype = (
            text.get("dtype") or text.get("torch_dtype") or config.get("dtype") or config.get("torch_dtype")
        )
        if dtype is not None:
            values["weight_dtype"] = dtype
    return values


def check_config_json(resolved: ResolvedProfile) -> Path | None:
    """Compare the model YAML's ``architecture_numbers`` with the downloaded ``config.json``.

    Returns:
        The ``config.json`` checked, or None when there is none yet (or no numbers to check).

    Raises:
        ConfigError: a field differs (each one named with both values), or the file is not valid JSON.
    """
    arch = resolved.model.architecture_numbers
    path = resolved.model_dir / "config.json"
    if arch is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{path}: not readable JSON: {exc}"], hint="re-download the model") from None
    yaml_path = f"configs/models/{resolved.model.name}.yaml"
    ours = arch.model_dump()
    problems = [
        f"{yaml_path}: architecture_numbers.{name}: {ours[name]!r}, but {path} says {value!r}"
        for name, value in _config_values(config).items()
        if name in ours and ours[name] is not None and ours[name] != value
    ]
    problems += [
        f"{yaml_path}: architecture_numbers.{name}: {ours[name]!r}, but {path} has no {name}"
        for name in ("linear_num_key_heads", "mamba_ssm_dtype")
        if ours[name] is not None and name not in _config_values(config)
    ]
    if problems:
        raise ConfigError(
            problems,
            hint=f"the numbers in {yaml_path} describe another checkpoint than {resolved.model_dir}: "
            "copy the values from its config.json into architecture_numbers (and its source:), or "
            "download the checkpoint the config names (make download)",
            title="the model config's architecture numbers do not match the downloaded config.json",
        )
    return path


def enforce(result: Plan) -> None:
    """Refuse a plan that does not fit.

    Raises:
        ConfigError: the plan's problems, with the nearest settings that fit and the override.
    """
    if result.fits:
        return
    hint = ""
    if result.suggestions:
        hint = "nearest settings that fit: " + "; ".join(result.suggestions) + "\n"
    hint += (
        "to start anyway (you know better than the planner's estimates): --no-plan-check, "
        'or SET="plan.check=false" with make'
    )
    raise ConfigError(
        [f"profile {result.profile}: {p}" for p in result.problems],
        hint=hint,
        title=f"profile {result.profile} does not fit its GPU memory (make plan PROFILE={result.profile})",
    )
