"""Build ``models/qwen3_5-tiny/``: a tiny random-weight model with Qwen3.6-27B's architecture.

Same classes and checkpoint layout as the real model (``Qwen3_5ForConditionalGeneration``, ``qwen3_5`` /
``qwen3_5_text``, 3:1 Gated DeltaNet / gated-attention layers, a vision tower, one MTP layer, untied
embeddings, a padded vocabulary), shrunk to a few MB so tests can serve and fine-tune it on a CPU:

- text: hidden 64, 4 layers ``[linear, linear, linear, full]``, head_dim 128, linear head dims 128 (the
  vLLM CPU backend rejects smaller ones), vocab 1024 > tokenizer size 1000;
- vision: 1 block of hidden 32;
- ``mtp.*``: the 15 tensors of vLLM's ``Qwen3_5MultiTokenPredictor`` (transformers writes none);
- tokenizer: a byte-level BPE trained on a small fixed corpus, Qwen's special tokens, and the chat template
  ``scripts/assets/qwen3_5_chat_template.jinja``;
- image / video processor configs, so vLLM also serves it without ``--language-model-only`` (images work).

Weights are random (seed 0): the model serves and trains but answers nonsense. Idempotent: ``kit-build.json``
records a hash of this script, the template and the config; a second run with the same inputs prints "up to
date". Atomic: built and verified in a hidden sibling folder, then renamed into place. Usage::

    python scripts/build_tiny_qwen3_5.py [--out DIR] [--force] [--show-template] [--max-position-embeddings N]

``--max-position-embeddings`` sizes the rotary table (default 4096). vLLM's rotary table holds that many
positions, so a longer ``max_model_len`` crashed the engine at the first longer request; Claude Code's
first request alone is far longer than 4k tokens, so ``make models-claude-code`` builds a 65,536-position
copy (``models/qwen3_5-tiny-64k``, served by ``configs/serve/cpu-claude-code.yaml``). The weights are the
same: rotary embeddings have none.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from serve.buildinfo import MANIFEST, is_up_to_date, read_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "models" / "qwen3_5-tiny"
TEMPLATE_PATH = Path(__file__).resolve().parent / "assets" / "qwen3_5_chat_template.jinja"
BUILDER_VERSION = "1"
SEED = 0
MTP_SEED = 1
DTYPE = "bfloat16"

# Tokenizer: BPE tokens first (ids 0..BPE_SIZE-1), then the added tokens, like Qwen's vocabulary; the model's
# vocabulary is padded beyond the tokenizer (VOCAB_SIZE > TOKENIZER_SIZE), as in the real checkpoint.
TOKENIZER_SIZE = 1000
VOCAB_SIZE = 1024
# (token, special): special tokens are dropped by skip_special_tokens; think / tool tokens are not.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
BPE_SIZE = TOKENIZER_SIZE - len(ADDED_TOKENS)
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# The pre-tokenizer of transformers' Qwen3_5Tokenizer (models/qwen3_5/tokenization_qwen3_5.py).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 128,
    "attn_output_gate": True,
    "partial_rotary_factor": 0.25,
    # rotary dim = 128 * 0.25 = 32; mrope sections sum to rotary dim / 2 (real model: [11, 11, 10] of 32).
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10_000_000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [6, 5, 5],
        "mrope_interleaved": True,
    },
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "mamba_ssm_dtype": "float32",
    "mtp_num_hidden_layers": 1,
    "mtp_use_dedicated_embeddings": False,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
# Bounds of --max-position-embeddings: a chat needs a few hundred positions; Qwen3.6-27B has 262,144.
MIN_POSITIONS = 256
MAX_POSITIONS = 262_144
# Popped by Qwen3_5TextConfig.__post_init__ (it derives layer_types); set back so config.json shows it.
FULL_ATTENTION_INTERVAL = 4
VISION_CONFIG: dict[str, Any] = {
    "depth": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": TEXT_CONFIG["hidden_size"],
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "num_position_embeddings": 256,
    "deepstack_visual_indexes": [],
}
# Image and video preprocessing as in Qwen3-VL / Qwen3.5 (patch 16, temporal patch 2, merge 2, mean/std 0.5).
IMAGE_PROCESSOR: dict[str, Any] = {
    "patch_size": VISION_CONFIG["patch_size"],
    "temporal_patch_size": VISION_CONFIG["temporal_patch_size"],
    "merge_size": VISION_CONFIG["spatial_merge_size"],
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "size": {"shortest_edge": 65_536, "longest_edge": 16_777_216},
}
VIDEO_PROCESSOR: dict[str, Any] = {
    **IMAGE_PROCESSOR,
    "size": {"shortest_edge": 4096, "longest_edge": 25_165_824},
}
GENERATION_CONFIG: dict[str, Any] = {
    # The real model's sampling preset; eos / pad ids are filled in from the tokenizer.
    "do_sample": True,
    "temperature": 1.0,
    "top_k": 20,
    "top_p": 0.95,
}

CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still learn the shape of a conversation:
who speaks, when a turn ends, and how a tool is called. This corpus is short on purpose, so that the
tokenizer trains in well under a second and always gives the same vocabulary.

Paris is the capital of France. Berlin is the capital of Germany, Madrid is the capital of Spain and Rome
is the capital of Italy. London, Tokyo, Washington, Ottawa and Canberra are capitals too. The weather in
Paris today is sunny with a light wind; tomorrow it will rain and the temperature will drop to twelve
degrees Celsius. What is the weather like where you are? How many people live in the city?

You are a helpful assistant. Answer the question as briefly as you can. If you do not know the answer, say
so. Think step by step before you answer, then give the final answer in one sentence. The user asked for a
summary of the report, a list of the open issues and a plan for the next release of the service.

Numbers and code: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 3.14 2026-11-29 12:30:00. def main() -> int:
return 0. for item in items: print(item). if value is None: raise ValueError("missing value"). import json,
os, sys. x = {"key": "value", "count": 3, "enabled": true, "ratio": 0.5, "tags": ["a", "b"], "note": null}.

{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a
city", "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city
name"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
{"name": "search", "arguments": {"query": "open weights models", "limit": 5}}
{"role": "system", "content": "..."} {"role": "user", "content": "Hello!"} {"role": "assistant",
"content": "Hi, how can I help you today?"} {"role": "tool", "content": "{\\"temperature\\": 21}"}

These functions are available to you. Each line is the JSON schema of one function. To use a function,
write one block in exactly this shape, with one parameter element per argument. Copy function and
parameter names from the schemas and supply every required parameter. Values may span several lines; write
objects and arrays as JSON. Several calls are written as consecutive blocks; write nothing after the last
one. Results come back in response blocks. If no function fits, answer directly.
<tool_call> <function=get_weather> <parameter=city> Paris </parameter> </function> </tool_call>
<tool_response> {"city": "Paris", "temperature": 21, "condition": "sunny"} </tool_response>
<think> The user wants the weather in Paris, so I should call the weather function first. </think>

Open-weights models can be served on your own hardware. A gateway in front of the engine checks keys,
counts tokens, limits rates and writes an audit log. Fine-tuning with low-rank adapters changes a small
number of weights; the adapter is merged or served next to the base model. Streaming answers arrive as
server-sent events, one small piece of text at a time, and the last event carries the usage numbers.

Once upon a time there was a little robot who wanted to read every book in the library. Each morning it
chose a new shelf, and each evening it told the librarian what it had learned: about rivers and mountains,
about stars and planets, about music, history, cooking, gardening and the long journeys of birds.
Questions, answers, requests, results, errors, warnings, retries, timeouts, tokens, prompts, messages.
"""


class BuildError(RuntimeError):
    """A build step produced something that fails its own checks."""


def read_template(path: Path = TEMPLATE_PATH) -> str:
    """Read the chat template.

    Args:
        path: the Jinja file.

    Returns:
        The template text.

    Raises:
        FileNotFoundError: the template is missing.
    """
    return path.read_text(encoding="utf-8")


def text_config_for(max_position_embeddings: int) -> dict[str, Any]:
    """``TEXT_CONFIG`` with another rotary table length.

    Args:
        max_position_embeddings: positions the model (and vLLM's rotary table) covers.

    Returns:
        A copy of ``TEXT_CONFIG``.
    """
    return {**TEXT_CONFIG, "max_position_embeddings": max_position_embeddings}


def inputs_manifest(template: str, text_config: dict[str, Any] = TEXT_CONFIG) -> dict[str, Any]:
    """Describe the build inputs; ``inputs_sha256`` decides whether an existing output is up to date.

    Args:
        template: the chat template text.
        text_config: the text config fields (``TEXT_CONFIG`` or ``text_config_for(...)``).

    Returns:
        Manifest fields: builder name and version and a sha256 over script, template and configs.
    """
    digest = hashlib.sha256()
    for part in (
        Path(__file__).read_bytes(),
        template.encode("utf-8"),
        json.dumps(
            {
                "text": text_config,
                "vision": VISION_CONFIG,
                "generation": GENERATION_CONFIG,
                "image_processor": IMAGE_PROCESSOR,
                "video_processor": VIDEO_PROCESSOR,
                "tokens": ADDED_TOKENS,
            },
            sort_keys=True,
        ).encode("utf-8"),
    ):
        digest.update(hashlib.sha256(part).digest())
    return {
        "builder": Path(__file__).name,
        "builder_version": BUILDER_VERSION,
        "inputs_sha256": digest.hexdigest(),
        "template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest(),
    }


def train_tokenizer(template: str, model_max_length: int = TEXT_CONFIG["max_position_embeddings"]) -> Any:
    """Train the byte-level BPE tokenizer and wrap it as transformers' ``Qwen3_5Tokenizer``.

    The pipeline (NFC, Qwen's split regex, byte-level) is the one ``Qwen3_5Tokenizer`` builds itself, so
    the saved ``tokenizer.json`` and the class agree. BPE tokens take ids ``0..BPE_SIZE-1``; the added
    tokens follow.

    Args:
        template: the chat template to embed.
        model_max_length: the tokenizer's ``model_max_length`` (the model's positions).

    Returns:
        A ``transformers`` ``Qwen3_5Tokenizer`` of ``TOKENIZER_SIZE`` tokens with the chat template set.

    Raises:
        BuildError: the corpus is too small for the target vocabulary or an id came out unexpected.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen3_5Tokenizer

    raw = Tokenizer(BPE())
    raw.normalizer = normalizers.NFC()
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    raw.train_from_iterator([CORPUS], trainer=trainer)
    if raw.get_vocab_size() != BPE_SIZE:
        raise BuildError(f"BPE training gave {raw.get_vocab_size()} tokens, wanted {BPE_SIZE}")
    model = json.loads(raw.to_str())["model"]

    tokenizer = Qwen3_5Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(merge) for merge in model["merges"]],
        unk_token=None,
        bos_token=None,
        eos_token=None,  # set below, once the added tokens have their ids in ADDED_TOKENS order
        pad_token=None,
        model_max_length=model_max_length,
    )
    for token, special in ADDED_TOKENS:
        added = AddedToken(token, special=special, normalized=False)
        if special:
            tokenizer.add_special_tokens(
                {"additional_special_tokens": [added]}, replace_extra_special_tokens=False
            )
        else:
            tokenizer.add_tokens([added])
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = PAD_TOKEN
    tokenizer.chat_template = template
    ids = tokenizer.convert_tokens_to_ids([token for token, _ in ADDED_TOKENS])
    if ids != list(range(BPE_SIZE, TOKENIZER_SIZE)) or len(tokenizer) != TOKENIZER_SIZE:
        raise BuildError(f"added token ids {ids}, tokenizer size {len(tokenizer)}")
    return tokenizer


def build_config(tokenizer: Any, text_config: dict[str, Any] = TEXT_CONFIG) -> Any:
    """Create the ``Qwen3_5Config`` with token ids taken from the tokenizer.

    Args:
        tokenizer: the tokenizer from ``train_tokenizer``.
        text_config: the text config fields.

    Returns:
        The model config.
    """
    from transformers import Qwen3_5Config

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token, _ in ADDED_TOKENS}
    text = {
        **text_config,
        "eos_token_id": ids[EOS_TOKEN],
        "pad_token_id": ids[PAD_TOKEN],
        "bos_token_id": None,
    }
    config = Qwen3_5Config(
        text_config=text,
        vision_config=dict(VISION_CONFIG),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.text_config.full_attention_interval = FULL_ATTENTION_INTERVAL
    config.architectures = ["Qwen3_5ForConditionalGeneration"]
    return config


def mtp_shapes(text_config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the MTP tensors that vLLM's ``Qwen3_5MultiTokenPredictor`` loads (one MTP layer).

    Args:
        text_config: the text config fields (``TEXT_CONFIG``).

    Returns:
        ``{name: shape}`` for the 15 ``mtp.*`` tensors of one MTP layer: fc, three norms and one
        full-attention decoder layer (q_proj doubled by the attention output gate).
    """
    hidden = text_config["hidden_size"]
    head_dim = text_config["head_dim"]
    q_out = text_config["num_attention_heads"] * head_dim * (2 if text_config["attn_output_gate"] else 1)
    kv_out = text_config["num_key_value_heads"] * head_dim
    inter = text_config["intermediate_size"]
    layer = "mtp.layers.0."
    return {
        "mtp.fc.weight": (hidden, 2 * hidden),
        "mtp.pre_fc_norm_embedding.weight": (hidden,),
        "mtp.pre_fc_norm_hidden.weight": (hidden,),
        "mtp.norm.weight": (hidden,),
        layer + "input_layernorm.weight": (hidden,),
        layer + "post_attention_layernorm.weight": (hidden,),
        layer + "self_attn.q_proj.weight": (q_out, hidden),
        layer + "self_attn.k_proj.weight": (kv_out, hidden),
        layer + "self_attn.v_proj.weight": (kv_out, hidden),
        layer + "self_attn.o_proj.weight": (hidden, text_config["num_attention_heads"] * head_dim),
        layer + "self_attn.q_norm.weight": (head_dim,),
        layer + "self_attn.k_norm.weight": (head_dim,),
        layer + "mlp.gate_proj.weight": (inter, hidden),
        layer + "mlp.up_proj.weight": (inter, hidden),
        layer + "mlp.down_proj.weight": (hidden, inter),
    }


def mtp_tensors(text_config: dict[str, Any], seed: int = MTP_SEED) -> dict[str, Any]:
    """Deterministic random MTP tensors in bfloat16.

    Matrices are N(0, 0.02) like transformers' init; norm weights are small N(0, 0.02) offsets, since
    Qwen3.5's RMSNorm scales by ``1 + weight``.

    Args:
        text_config: the text config fields (``TEXT_CONFIG``).
        seed: generator seed.

    Returns:
        ``{name: tensor}`` for ``mtp_shapes(text_config)``.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(shape, generator=generator) * 0.02).to(getattr(torch, DTYPE)).contiguous()
        for name, shape in mtp_shapes(text_config).items()
    }


def build(
    staging: Path, template: str, manifest: dict[str, Any], text_config: dict[str, Any] = TEXT_CONFIG
) -> dict[str, Any]:
    """Write tokenizer, config, random weights (with ``mtp.*``) and generation config into ``staging``.

    Args:
        staging: empty folder to write into.
        template: the chat template text.
        manifest: the inputs from ``inputs_manifest``; completed and written as ``kit-build.json``.
        text_config: the text config fields.

    Returns:
        The manifest that was written.

    Raises:
        BuildError: the saved checkpoint has an unexpected layout.
    """
    import safetensors.torch
    import tokenizers
    import torch
    import transformers
    from transformers import (
        GenerationConfig,
        Qwen2VLImageProcessor,
        Qwen3_5ForConditionalGeneration,
        Qwen3VLVideoProcessor,
    )

    tokenizer = train_tokenizer(template, text_config["max_position_embeddings"])
    config = build_config(tokenizer, text_config)
    torch.manual_seed(SEED)
    model = Qwen3_5ForConditionalGeneration(config).to(getattr(torch, DTYPE))
    model.config.dtype = DTYPE
    eos_ids = [tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids(PAD_TOKEN)]
    model.generation_config = GenerationConfig(
        eos_token_id=eos_ids, pad_token_id=eos_ids[1], bos_token_id=None, **GENERATION_CONFIG
    )
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    Qwen2VLImageProcessor(**IMAGE_PROCESSOR).save_pretrained(staging)  # preprocessor_config.json
    Qwen3VLVideoProcessor(**VIDEO_PROCESSOR).save_pretrained(staging)  # video_preprocessor_config.json

    weights_file = staging / "model.safetensors"
    if not weights_file.is_file():
        raise BuildError(
            f"expected a single model.safetensors, got {sorted(p.name for p in staging.iterdir())}"
        )
    tensors = safetensors.torch.load_file(weights_file)
    if any(name.startswith("mtp.") for name in tensors):
        raise BuildError("transformers unexpectedly saved mtp.* tensors")
    tensors.update(mtp_tensors(TEXT_CONFIG))
    safetensors.torch.save_file(dict(sorted(tensors.items())), weights_file, metadata={"format": "pt"})

    written = {
        **manifest,
        "dtype": DTYPE,
        "seed": SEED,
        "max_position_embeddings": text_config["max_position_embeddings"],
        "tokenizer_size": len(tokenizer),
        "vocab_size": VOCAB_SIZE,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokenizers_version": tokenizers.__version__,
    }
    (staging / MANIFEST).write_text(json.dumps(written, indent=2) + "\n", encoding="utf-8")
    return written


def assistant_mask_check(tokenizer: Any) -> tuple[int, str]:
    """Check that ``return_assistant_tokens_mask`` covers exactly the assistant output.

    Args:
        tokenizer: a tokenizer carrying the kit's chat template.

    Returns:
        The number of masked tokens and their decoded text.

    Raises:
        BuildError: the masked tokens are not exactly the assistant turns' generation parts.
    """
    messages = example_conversations()["tools"]["messages"]
    tools = example_conversations()["tools"]["tools"]
    out = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    masked = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    tool_call = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
    )
    expected = (
        # Both assistant turns follow the last user query, so both render a think block; the first one is
        # empty and belongs to the prompt (as with enable_thinking: false), so it gets no loss.
        f"I will look that up.\n\n{tool_call}<|im_end|>"
        "<think>\nThe tool says sunny.\n</think>\n\nIt is sunny in Paris, 21 °C.<|im_end|>"
    )
    if masked != expected:
        raise BuildError(f"assistant mask covers {masked!r}, expected {expected!r}")
    # Masked positions must be contiguous runs that each end with <|im_end|>.
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    ends = [ids[i] for i in range(len(ids)) if mask[i] and (i + 1 == len(ids) or not mask[i + 1])]
    if ends != [eos, eos]:
        raise BuildError(f"masked runs end with {ends}, expected two {EOS_TOKEN}")
    return sum(mask), masked


def verify(folder: Path, text_config: dict[str, Any] = TEXT_CONFIG) -> dict[str, Any]:
    """Load the built folder the way users will and check layout, template and a forward pass.

    Args:
        folder: a built checkpoint folder.
        text_config: the text config fields it was built with.

    Returns:
        Facts for the progress output: key counts, mtp keys, mask size, logits shape, folder size.

    Raises:
        BuildError: any check fails.
    """
    import safetensors
    import torch
    from transformers import AutoProcessor, AutoTokenizer, Qwen3_5ForConditionalGeneration

    with safetensors.safe_open(folder / "model.safetensors", framework="pt") as handle:
        keys = list(handle.keys())
    prefixes = ("model.language_model.", "model.visual.", "lm_head.", "mtp.")
    stray = [key for key in keys if not key.startswith(prefixes)]
    mtp = sorted(key for key in keys if key.startswith("mtp."))
    if stray or mtp != sorted(mtp_shapes(TEXT_CONFIG)) or "lm_head.weight" not in keys:
        raise BuildError(f"unexpected checkpoint keys: stray={stray} mtp={mtp}")

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if type(tokenizer).__name__ != "Qwen3_5Tokenizer" or tokenizer.chat_template != read_template():
        raise BuildError(f"tokenizer reloads as {type(tokenizer).__name__} or without the chat template")
    sample = CORPUS[:400] + " Größe, 東京, emoji 😀, tabs\tand  spaces."
    if tokenizer.decode(tokenizer.encode(sample)) != sample:
        raise BuildError("the tokenizer does not round-trip text")
    mask_tokens, _ = assistant_mask_check(tokenizer)
    processor = AutoProcessor.from_pretrained(folder)
    if type(processor).__name__ != "Qwen3VLProcessor":
        raise BuildError(f"the processor loads as {type(processor).__name__}, expected Qwen3VLProcessor")

    model = Qwen3_5ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    if model.get_input_embeddings().weight.shape[0] != VOCAB_SIZE:
        raise BuildError("the padded vocabulary was not preserved")
    positions = model.config.text_config.max_position_embeddings
    if positions != text_config["max_position_embeddings"]:
        raise BuildError(
            f"config.json has {positions} positions, wanted {text_config['max_position_embeddings']}"
        )
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.inference_mode():
        logits = model(**inputs).logits
    if logits.shape[-1] != VOCAB_SIZE or not torch.isfinite(logits).all():
        raise BuildError(f"bad logits: shape {tuple(logits.shape)}")
    return {
        "keys": len(keys),
        "language_model_keys": sum(key.startswith("model.language_model.") for key in keys),
        "visual_keys": sum(key.startswith("model.visual.") for key in keys),
        "mtp_keys": mtp,
        "assistant_mask_tokens": mask_tokens,
        "logits_shape": tuple(logits.shape),
        "size_bytes": sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()),
    }


def example_conversations() -> dict[str, dict[str, Any]]:
    """Conversations that exercise the chat template (used by ``--show-template`` and the mask check).

    Returns:
        ``{name: {"messages": [...], "tools": [...] or None, "kwargs": {...}}}``.
    """
    weather_tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather forecast for a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
    return {
        "plain": {"messages": [{"role": "user", "content": "Hello!"}], "tools": None, "kwargs": {}},
        "system_no_thinking": {
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Capital of France?"},
            ],
            "tools": None,
            "kwargs": {"enable_thinking": False},
        },
        "reasoning": {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "reasoning_content": "Old reasoning, dropped.", "content": "4"},
                {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "reasoning_content": "Add three and three.", "content": "6"},
            ],
            "tools": None,
            "kwargs": {},
        },
        "tools": {
            "messages": [
                {"role": "system", "content": "You help with travel."},
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": "I will look that up.",
                    "tool_calls": [
                        {
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}},
                        }
                    ],
                },
                {"role": "tool", "content": '{"condition": "sunny", "temperature": 21}'},
                {
                    "role": "assistant",
                    "reasoning_content": "The tool says sunny.",
                    "content": "It is sunny in Paris, 21 °C.",
                },
            ],
            "tools": [weather_tool],
            "kwargs": {},
        },
        "tools_json_string_arguments": {
            "messages": [
                {"role": "user", "content": "Weather in Rome and Oslo?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                        },
                        {
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
                        },
                    ],
                },
                {"role": "tool", "content": "rain"},
                {"role": "tool", "content": "snow"},
            ],
            "tools": [weather_tool],
            "kwargs": {"enable_thinking": True},
        },
    }


def render_examples(tokenizer: Any) -> str:
    """Render every example conversation with a generation prompt where the last turn is not the assistant's.

    Args:
        tokenizer: a tokenizer carrying the kit's chat template.

    Returns:
        The renders, each under a ``=== name ===`` header.
    """
    parts = []
    for name, example in example_conversations().items():
        add_prompt = example["messages"][-1]["role"] != "assistant"
        text = tokenizer.apply_chat_template(
            example["messages"],
            tools=example["tools"],
            tokenize=False,
            add_generation_prompt=add_prompt,
            **example["kwargs"],
        )
        parts.append(f"=== {name} (add_generation_prompt={add_prompt}, {example['kwargs']}) ===\n{text}")
    return "\n".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.

    Returns:
        The parsed options.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when the output is up to date")
    parser.add_argument(
        "--show-template", action="store_true", help="print example renders of the chat template and exit"
    )
    parser.add_argument(
        "--max-position-embeddings",
        type=int,
        default=TEXT_CONFIG["max_position_embeddings"],
        metavar="N",
        help="positions of the rotary table, the longest context vLLM may serve "
        f"(default {TEXT_CONFIG['max_position_embeddings']}; Claude Code needs far more than 4096)",
    )
    args = parser.parse_args(argv)
    if not MIN_POSITIONS <= args.max_position_embeddings <= MAX_POSITIONS:
        parser.error(
            f"--max-position-embeddings must be between {MIN_POSITIONS} and {MAX_POSITIONS} "
            f"(Qwen3.6-27B's own), got {args.max_position_embeddings}"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    """Build (if needed) and verify the tiny Qwen3.5-architecture checkpoint.

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.

    Returns:
        Process exit status.
    """
    args = parse_args(argv)
    out: Path = args.out.resolve()
    template = read_template()
    text_config = text_config_for(args.max_position_embeddings)
    if args.show_template:
        tokenizer = train_tokenizer(template)
        print(render_examples(tokenizer))
        count, masked = assistant_mask_check(tokenizer)
        print(f"=== assistant mask ({count} tokens) ===\n{masked}")
        return 0

    manifest = inputs_manifest(template, text_config)
    if not args.force and is_up_to_date(out, manifest, "inputs_sha256"):
        print(f"{out}: up to date (inputs sha256 {manifest['inputs_sha256'][:12]})")
        return 0
    if out.exists() and not args.force and read_manifest(out) is None:
        print(
            f"error: {out} exists and was not made by this builder; use --force to replace it",
            file=sys.stderr,
        )
        return 1

    from transformers.utils import logging as hf_logging

    from serve.atomic import atomic_dir

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    print(f"building {out} ...")
    started = time.monotonic()
    try:
        with atomic_dir(out, replace=True) as staging:
            build(staging, template, manifest, text_config)
            facts = verify(staging, text_config)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"built {out} in {time.monotonic() - started:.1f} s ({facts['size_bytes'] / 1e6:.1f} MB, "
        f"{text_config['max_position_embeddings']} positions): "
        f"{facts['keys']} tensors ({facts['language_model_keys']} model.language_model.*, "
        f"{facts['visual_keys']} model.visual.*, lm_head.weight, {len(facts['mtp_keys'])} mtp.*), "
        f"forward logits {facts['logits_shape']}, assistant mask {facts['assistant_mask_tokens']} tokens"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
