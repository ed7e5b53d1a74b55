"""Check a LoRA adapter against the base and the serve profile before vLLM ever sees it.

The trap this guards against: vLLM maps checkpoint names of ``Qwen3_5ForConditionalGeneration``
(``model.language_model.*``); an adapter whose keys name ``model.layers.*`` (trained through the causal-LM
class) loads in vLLM without an error and changes nothing
(docs/reference.md#lora-on-qwen36-the-key-prefix-trap; vLLM issues 48019, 49354). The check is general:
every LoRA module must name a weight that exists in the base checkpoint, and a known prefix mismatch can
be rewritten.

These checks live in ``serve`` because serving runs them on every adapter before vLLM starts
(``kit serve`` / ``kit up``); fine-tuning reuses them (``finetune.adapters`` re-exports this module).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from serve.config import adapter_rank

ADAPTER_INFO = "kit-adapter.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# (prefix an adapter wrongly has, prefix the served class uses): causal-LM vs conditional-generation naming.
_KNOWN_REMAPS = (("model.", "model.language_model."),)


class AdapterError(Exception):
    """The adapter cannot be served as it is; the message says why and what fixes it."""


def unservable_reason(module: str) -> str | None:
    """Why a LoRA on ``module`` (a dotted module name) must not be trained or served, or None.

    vLLM serves LoRA on the language model's linear layers only: it cannot serve embedding / output-head
    adapters or full module copies (docs/reference.md#lora-on-qwen36-the-key-prefix-trap), and an adapter
    must never change the vision tower or the MTP head (the draft model speculative decoding relies on).
    """
    parts = module.split(".")
    if "visual" in parts:
        return "the vision tower"
    if "mtp" in parts:
        return "the MTP head"
    if any(p in {"embed_tokens", "lm_head", "wte", "embed_out"} for p in parts):
        return "an embedding or the output head"
    return None


def _base_tensors(base_dir: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor in the base checkpoint (safetensors headers only)."""
    from safetensors import safe_open

    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for shard in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                piece = handle.get_slice(name)
                out[name] = (str(piece.get_dtype()), tuple(piece.get_shape()))
    if not out:
        raise AdapterError(f"no safetensors weights in {base_dir}")
    return out


def base_fingerprint(base_dir: Path) -> str:
    """sha256 over ``config.json`` and every tensor's name, dtype and shape (headers only: fast at 52 GiB)."""
    digest = hashlib.sha256((base_dir / "config.json").read_bytes())
    for name, (dtype, shape) in sorted(_base_tensors(base_dir).items()):
        digest.update(f"{name}:{dtype}:{shape}\n".encode())
    return digest.hexdigest()


def _module_of(key: str) -> str | None:
    """``base_model.model.X.lora_A.weight`` -> ``X`` (None for keys that are not LoRA A/B matrices)."""
    if ".lora_" not in key:
        return None
    return key.removeprefix(_PEFT_PREFIX).split(".lora_")[0]


@dataclass(frozen=True)
class KeyCheck:
    """What ``check_keys`` found: how many LoRA modules, which keys it rewrote, the largest rank in the
    weights (rows of the ``lora_A`` matrices)."""

    modules: int
    renamed: list[str]
    max_rank: int


def check_keys(adapter_dir: Path, base_dir: Path, *, fix: bool = False) -> KeyCheck:
    """Verify that every LoRA module names a weight of the base; optionally rewrite known mismatches.

    Args:
        adapter_dir: folder with ``adapter_model.safetensors``.
        base_dir: the base checkpoint vLLM serves.
        fix: rewrite keys with a known prefix mismatch (atomically) instead of failing.

    Returns:
        The number of LoRA modules and the keys that were rewritten (none when none needed it).

    Raises:
        AdapterError: keys that match no base weight (and cannot or may not be rewritten), full tensors
            (not LoRA A/B matrices), or LoRA on modules vLLM cannot serve (:func:`unservable_reason`).
    """
    from safetensors.torch import load_file, save_file

    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AdapterError(f"{weights} not found: is {adapter_dir} a peft LoRA adapter?")
    tensors = load_file(str(weights))
    full = [k for k in tensors if _module_of(k) is None]
    if full:
        raise AdapterError(
            f"{len(full)} adapter tensors are not LoRA matrices, e.g. {full[0]}: a full module copy "
            "(modules_to_save, a trained embedding) that vLLM cannot serve; retrain without it"
        )
    reasons = {k: r for k in tensors if (r := unservable_reason(_module_of(k) or ""))}
    if reasons:
        key, reason = next(iter(reasons.items()))
        raise AdapterError(
            f"{len(reasons)} adapter tensors are LoRA on {reason}, e.g. {key}: vLLM cannot serve that (or "
            "it must never change); retrain with target_modules restricted to the language model"
        )
    base = _base_tensors(base_dir)
    renames: dict[str, str] = {}
    unmatched: list[str] = []
    for key in tensors:
        module = _module_of(key)
        if module is None or f"{module}.weight" in base:
            continue
        for wrong, right in _KNOWN_REMAPS:
            candidate = right + module.removeprefix(wrong)
            if module.startswith(wrong) and not module.startswith(right) and f"{candidate}.weight" in base:
                renames[key] = key.replace(_PEFT_PREFIX + module, _PEFT_PREFIX + candidate, 1)
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise AdapterError(
            f"{len(unmatched)} adapter keys name no weight of the base in {base_dir}, e.g. "
            f"{unmatched[0]}: it was trained on another model"
        )
    if renames and not fix:
        first = next(iter(renames))
        raise AdapterError(
            f"{len(renames)} adapter keys use the causal-LM naming ({first}) but the served class names "
            f"the weight {renames[first]}; vLLM would load it and silently change nothing. Rewrite them with "
            "`make check-adapter ADAPTER=... FIX=1`, or train through the class vLLM serves."
        )
    if renames:
        fixed = {renames.get(k, k): v for k, v in tensors.items()}
        fd, tmp = tempfile.mkstemp(dir=adapter_dir, suffix=".safetensors.tmp")
        os.close(fd)
        save_file(fixed, tmp, metadata={"format": "pt"})
        os.replace(tmp, weights)
    modules = {m for k in tensors if (m := _module_of(renames.get(k, k))) is not None}
    ranks = [int(v.shape[0]) for k, v in tensors.items() if ".lora_A." in k and v.ndim == 2]
    return KeyCheck(len(modules), list(renames), max(ranks, default=0))


def _sorted(targets: object) -> object:
    """peft writes list targets from a set (random order); sort them for a stable report."""
    return sorted(targets) if isinstance(targets, list) else targets


@dataclass
class Report:
    """Outcome of ``check_adapter``: ``problems`` make it unservable; ``notes`` are for the operator."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    """One line per check that passed, for the operator to read."""
    rank: int | None = None


def check_adapter(
    adapter_dir: Path, base_dir: Path, served_model_name: str, max_lora_rank: int | None, *, fix: bool = False
) -> Report:
    """All static checks of an adapter against the base and profile it will be served with.

    Args:
        adapter_dir: a peft LoRA folder.
        base_dir: the base checkpoint of the serve profile.
        served_model_name: the profile's model id (compared with ``base_model_name_or_path``).
        max_lora_rank: the profile's ``max_lora_rank`` (None: the profile has LoRA off).
        fix: rewrite known key-prefix mismatches.

    Returns:
        The report: an empty ``problems`` list means vLLM can serve the adapter with that profile.
    """
    report = Report()
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        report.problems.append(f"{config_path} not found: not a peft adapter folder")
        return report
    if not (base_dir / "config.json").is_file():
        report.problems.append(
            f"the served base is not on disk ({base_dir / 'config.json'} not found): download or build it "
            "first (make download / make models), or name another profile"
        )
        return report
    try:
        config = json.loads(config_path.read_text())
        rank = adapter_rank(config)
    except (ValueError, AttributeError) as exc:  # JSONDecodeError is a ValueError
        report.problems.append(f"{config_path}: not a valid peft adapter config: {exc}")
        return report
    report.rank = rank
    if config.get("peft_type", "LORA") != "LORA":
        report.problems.append(f"peft_type {config.get('peft_type')}: vLLM serves LoRA adapters only")
    else:
        report.passed.append(
            f"LoRA r={config.get('r')}, lora_alpha={config.get('lora_alpha')}, "
            f"target_modules {_sorted(config.get('target_modules'))}"
            + (f", rank_pattern {config['rank_pattern']}" if config.get("rank_pattern") else "")
        )
    if not config.get("modules_to_save") and not config.get("use_dora"):
        report.passed.append("no modules_to_save, no DoRA (both unservable by vLLM)")
    if config.get("modules_to_save"):
        report.problems.append(
            f"modules_to_save {config['modules_to_save']}: vLLM cannot serve full module copies"
        )
    if config.get("use_dora"):
        report.problems.append("use_dora: vLLM does not serve DoRA adapters")
    if max_lora_rank is None:
        report.notes.append(
            f"the serve profile has LoRA off: serve with vllm.enable_lora true and "
            f"vllm.max_lora_rank >= {rank}"
        )
    elif isinstance(rank, int) and rank > max_lora_rank:
        report.problems.append(
            f"rank {rank} (largest of r and rank_pattern) exceeds the profile's max_lora_rank {max_lora_rank}"
        )
    else:
        report.passed.append(f"rank {rank} <= the profile's max_lora_rank {max_lora_rank}")
    if config.get("base_model_name_or_path") == served_model_name:
        report.passed.append(f"base_model_name_or_path is the served model {served_model_name!r}")
    else:
        report.problems.append(
            f"base_model_name_or_path is {config.get('base_model_name_or_path')!r}, but the "
            f"profile serves {served_model_name!r}"
        )
    info_path = adapter_dir / ADAPTER_INFO
    if info_path.is_file():
        recorded = json.loads(info_path.read_text()).get("base_fingerprint")
        if recorded != base_fingerprint(base_dir):
            report.problems.append(f"the base fingerprint differs from {base_dir}: trained on other weights")
        else:
            report.passed.append(f"base fingerprint matches {base_dir}")
    else:
        report.notes.append(f"no {ADAPTER_INFO}: trained outside the kit, base fingerprint not checked")
    try:
        keys = check_keys(adapter_dir, base_dir, fix=fix)
        report.passed.append(
            f"all {keys.modules} LoRA modules name language-model weights of the served base"
        )
        if keys.renamed:
            report.notes.append(f"rewrote {len(keys.renamed)} keys to the served class's naming")
        if keys.max_rank > rank:
            report.rank = keys.max_rank
            report.problems.append(
                f"the weights have rank {keys.max_rank}, above the r / rank_pattern of {config_path} "
                f"({rank}): the config does not describe these weights"
            )
    except AdapterError as exc:
        report.problems.append(str(exc))
    return report
