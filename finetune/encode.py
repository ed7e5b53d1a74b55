"""Conversations -> token ids and labels, with the loss on assistant tokens only.

The chat template marks what the assistant writes with ``{% generation %}``; transformers'
``apply_chat_template(..., return_assistant_tokens_mask=True)`` turns that into a mask, so prompt, system,
tool results and the chat scaffolding get label -100. Multi-turn samples train every assistant turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.data import DataError, Sample

IGNORE = -100  # the label torch's cross-entropy ignores


@dataclass(frozen=True)
class Encoded:
    """One training sequence. ``labels[i]`` is ``input_ids[i]`` on assistant tokens, else -100."""

    line: int
    input_ids: list[int]
    labels: list[int]


def load_template(template_path: Path | None, tokenizer: Any) -> str:
    """The training chat template: the recipe's file, else the tokenizer's own.

    Raises:
        DataError: the template has no ``{% generation %}`` markers (the loss mask could not be built).
    """
    if template_path is not None:
        template = template_path.read_text(encoding="utf-8")
        where = str(template_path)
    else:
        template = tokenizer.chat_template or ""
        where = "the model's own chat template"
    if "generation" not in template or "endgeneration" not in template:
        raise DataError(
            [
                f"{where}: has no {{% generation %}} markers, so assistant tokens cannot be told "
                "from the prompt; set `chat_template` in the recipe to a template that has them"
            ]
        )
    return template


def end_of_turn_ids(tokenizer: Any, generation_eos: int | list[int] | None) -> set[int]:
    """Token ids that may end an assistant turn: the tokenizer's eos and generation_config's eos ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif generation_eos:
        ids.update(generation_eos)
    return ids


def capability_problems(samples: list[Sample], template: str, path: Path) -> list[str]:
    """Samples the template cannot render faithfully (their tool calls or thinking would vanish)."""
    problems = []
    for sample in samples:
        if "tool_calls" not in template and any(m.get("tool_calls") for m in sample.messages):
            problems.append(f"{path}:{sample.line}: has tool_calls, but the chat template cannot render them")
        if "reasoning" not in template and any(m.get("reasoning_content") for m in sample.messages):
            problems.append(
                f"{path}:{sample.line}: has reasoning_content, but the chat template drops thinking"
            )
        if sample.tools and "tools" not in template:
            problems.append(f"{path}:{sample.line}: has tools, but the chat template ignores them")
    return problems


def special_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens as text (``<|im_end|>``, ``<|im_start|>``, ``<|endoftext|>``...):
    its named specials plus the added tokens flagged ``special``. Longest first."""
    found = set(tokenizer.all_special_tokens)
    found.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted((t for t in found if t), key=len, reverse=True)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def special_token_problems(sample: Sample, tokens: list[str]) -> list[str]:
    """Where one conversation's text contains a special token (problems without the ``path:line:``).

    The chat template pastes text in verbatim and the tokenizer turns ``<|im_end|>`` in it into the real
    end-of-turn token, so such text would end a turn early or fake a new one (``<|im_start|>user``)
    inside a training sequence: rejected, whatever the role.
    """
    problems = []
    for index, message in enumerate(sample.messages):
        text = "\n".join(_strings({k: v for k, v in message.items() if k != "role"}))
        hits = [t for t in tokens if t in text]
        if hits:
            problems.append(
                f"messages[{index}] ({message['role']}) contains the special token {hits[0]!r}, which "
                "would end or fake a turn in training; remove it"
            )
    tool_hits = [t for t in tokens if t in "\n".join(_strings(sample.tools))]
    if tool_hits:
        problems.append(f"tools contain the special token {tool_hits[0]!r}; remove it")
    return problems


def encode(sample: Sample, tokenizer: Any, template: str) -> Encoded:
    """Render one sample with ``template`` and build its labels from the assistant mask."""
    out = tokenizer.apply_chat_template(
        sample.messages,
        tools=sample.tools,
        chat_template=template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids = list(out["input_ids"])
    mask = list(out["assistant_masks"])
    labels = [tok if keep else IGNORE for tok, keep in zip(ids, mask, strict=True)]
    return Encoded(sample.line, ids, labels)


def sequence_problems(enc: Encoded, end_ids: set[int]) -> list[str]:
    """Checks every training sequence must pass: some tokens carry loss, and every assistant run ends
    with exactly one end-of-turn token (so the model learns to stop, once)."""
    labelled = [i for i, lab in enumerate(enc.labels) if lab != IGNORE]
    if not labelled:
        return ["no assistant tokens to learn from"]
    problems = []
    run_ends = [i for i in labelled if i + 1 >= len(enc.labels) or enc.labels[i + 1] == IGNORE]
    ends = set(run_ends)  # an end-of-turn just before a run's end is reported as "twice" below
    inner = [i for i in labelled if enc.labels[i] in end_ids and i not in ends and i + 1 not in ends]
    if inner:
        problems.append("an assistant turn has an end-of-turn token before its end")
    for end in run_ends:
        if enc.labels[end] not in end_ids:
            problems.append(
                f"an assistant turn does not end with the end-of-turn token (ends with id {enc.labels[end]})"
            )
        elif end > 0 and enc.labels[end - 1] in end_ids:
            problems.append("an assistant turn ends with the end-of-turn token twice")
    return problems


def encode_checked(
    samples: list[Sample], tokenizer: Any, template: str, max_seq_length: int, path: Path, end_ids: set[int]
) -> tuple[list[Encoded], list[str]]:
    """Encode every sample and check it: template capabilities, special tokens in the text, length,
    loss mask and end-of-turn tokens.

    Returns:
        ``(encoded sequences, every problem as path:line: message)``.
    """
    problems = capability_problems(samples, template, path)
    tokens = special_tokens(tokenizer)
    encoded = []
    for sample in samples:
        enc = encode(sample, tokenizer, template)
        if len(enc.input_ids) > max_seq_length:
            problems.append(
                f"{path}:{sample.line}: {len(enc.input_ids)} tokens, over the recipe's "
                f"max_seq_length of {max_seq_length} (shorten it or raise data.max_seq_length)"
            )
        # A special token in the text also breaks the turn structure; report the cause only.
        found = special_token_problems(sample, tokens) or sequence_problems(enc, end_ids)
        problems += [f"{path}:{sample.line}: {p}" for p in found]
        encoded.append(enc)
    return encoded, problems


def encode_all(
    samples: list[Sample], tokenizer: Any, template: str, max_seq_length: int, path: Path, end_ids: set[int]
) -> list[Encoded]:
    """:func:`encode_checked`, raising when anything is wrong.

    Raises:
        DataError: listing each problem as ``path:line: message``.
    """
    encoded, problems = encode_checked(samples, tokenizer, template, max_seq_length, path, end_ids)
    if problems:
        raise DataError(problems, path)
    return encoded


def pad_id_for_training(tokenizer: Any, end_ids: set[int]) -> int:
    """A pad id that is not an end-of-turn id (SmolLM2 ships pad == eos == <|im_end|>).

    Padding is masked by position anyway (labels -100, attention 0); a distinct id keeps any code that
    masks by token id from silently dropping the end-of-turn loss.
    """
    pad = tokenizer.pad_token_id
    if pad is not None and pad not in end_ids:
        return int(pad)
    for candidate in (tokenizer.unk_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>"), 0):
        if isinstance(candidate, int) and candidate >= 0 and candidate not in end_ids:
            return candidate
    raise DataError(["the tokenizer has no token usable for padding besides its end-of-turn token"])


class Collator:
    """Pads a batch of ``Encoded`` to its longest sequence (right padding; labels -100 on padding)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[Encoded]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, enc in enumerate(batch):
            n = len(enc.input_ids)
            ids[row, :n] = torch.tensor(enc.input_ids)
            labels[row, :n] = torch.tensor(enc.labels)
            attention[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attention}
