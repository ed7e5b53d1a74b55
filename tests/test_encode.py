"""Token-level checks of the loss mask on the real templates: only assistant output carries loss."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from finetune.data import DataError, Sample, load_samples
from finetune.encode import (
    IGNORE,
    Collator,
    capability_problems,
    encode,
    encode_all,
    load_template,
    pad_id_for_training,
    sequence_problems,
)

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "qwen3_5-tiny"
SMOL = ROOT / "models" / "smollm2-135m-instruct"
SMOL_TEMPLATE = ROOT / "finetune" / "templates" / "chatml_smollm2.jinja"
GOOD = ROOT / "tests" / "fixtures" / "data" / "good.jsonl"


@pytest.fixture(scope="module")
def tiny_tok():
    return AutoTokenizer.from_pretrained(TINY)


@pytest.fixture(scope="module")
def smol_tok():
    return AutoTokenizer.from_pretrained(SMOL)


def _trained_text(tok, enc) -> list[str]:
    """Decoded runs of consecutive labelled tokens."""
    runs, current = [], []
    for label in [*enc.labels, IGNORE]:
        if label != IGNORE:
            current.append(label)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs


def test_multi_turn_trains_every_assistant_turn_and_nothing_else(smol_tok):
    sample = Sample(
        1,
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
        ],
        None,
    )
    enc = encode(sample, smol_tok, load_template(SMOL_TEMPLATE, smol_tok))
    assert _trained_text(smol_tok, enc) == ["Hello!<|im_end|>", "Goodbye.<|im_end|>"]
    assert sequence_problems(enc, {smol_tok.eos_token_id}) == []
    # The training template renders exactly what SmolLM2's own template renders.
    stock = smol_tok.apply_chat_template(sample.messages, tokenize=False)
    ours = smol_tok.apply_chat_template(
        sample.messages, tokenize=False, chat_template=SMOL_TEMPLATE.read_text()
    )
    assert stock == ours


def test_tools_and_thinking_on_the_qwen3_5_template(tiny_tok):
    samples = load_samples(GOOD)
    template = load_template(None, tiny_tok)
    tool_sample = next(s for s in samples if s.tools)
    runs = _trained_text(tiny_tok, encode(tool_sample, tiny_tok, template))
    assert any("<tool_call>\n<function=" in run for run in runs), runs
    assert all(run.endswith("<|im_end|>") for run in runs)
    assert not any("<tool_response>" in run for run in runs), "tool results are prompt, not output"
    thinking = next(s for s in samples if any(m.get("reasoning_content") for m in s.messages))
    runs = _trained_text(tiny_tok, encode(thinking, tiny_tok, template))
    assert runs[-1].startswith("<think>\n") and "</think>" in runs[-1]


def test_an_answer_without_reasoning_does_not_learn_an_empty_think_block(tiny_tok):
    sample = Sample(1, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], None)
    enc = encode(sample, tiny_tok, load_template(None, tiny_tok))
    text = tiny_tok.decode(enc.input_ids)
    assert "<think>\n\n</think>\n\nHello." in text  # rendered, as enable_thinking: false renders it
    assert _trained_text(tiny_tok, enc) == ["Hello.<|im_end|>"]  # but not trained


def test_a_sample_with_only_a_closing_think_tag_trains_a_clean_sequence(tiny_tok, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "Q"}, '
        '{"role": "assistant", "content": "I should answer.</think>\\n\\nA."}]}\n'
    )
    enc = encode(load_samples(data)[0], tiny_tok, load_template(None, tiny_tok))
    text = tiny_tok.decode(enc.input_ids)
    assert text.count("<think>") == 1 and text.count("</think>") == 1
    assert _trained_text(tiny_tok, enc) == ["<think>\nI should answer.\n</think>\n\nA.<|im_end|>"]


def test_padding_never_hides_the_end_of_turn_loss(smol_tok):
    end_ids = {smol_tok.eos_token_id}
    assert smol_tok.pad_token_id in end_ids, "SmolLM2 ships pad == eos: the case this guards"
    pad = pad_id_for_training(smol_tok, end_ids)
    assert pad not in end_ids
    template = load_template(SMOL_TEMPLATE, smol_tok)
    short = encode(
        Sample(1, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], None),
        smol_tok,
        template,
    )
    long = encode(
        Sample(
            2,
            [{"role": "user", "content": "a b c d e f"}, {"role": "assistant", "content": "b c d e f g"}],
            None,
        ),
        smol_tok,
        template,
    )
    batch = Collator(pad)([short, long])
    row = batch["labels"][0]
    n = len(short.input_ids)
    assert row[:n].tolist() == short.labels and (row[n:] == IGNORE).all()
    assert smol_tok.eos_token_id in row.tolist()
    assert (batch["input_ids"][0, n:] == pad).all() and batch["attention_mask"][0, n:].sum() == 0


def test_templates_without_markers_or_capabilities_are_refused(smol_tok, tiny_tok, tmp_path):
    with pytest.raises(DataError, match="generation"):
        load_template(None, smol_tok)  # SmolLM2's stock template has no markers
    samples = load_samples(GOOD)
    problems = capability_problems(samples, SMOL_TEMPLATE.read_text(), GOOD)
    assert any("tool_calls" in p for p in problems) and any("reasoning_content" in p for p in problems)


def test_over_long_samples_are_reported_with_their_lines(tiny_tok):
    samples = load_samples(GOOD)
    with pytest.raises(DataError) as caught:
        encode_all(samples, tiny_tok, load_template(None, tiny_tok), 40, GOOD, {tiny_tok.eos_token_id})
    over = [p for p in caught.value.problems if "max_seq_length of 40" in p]
    assert len(over) >= 3 and all(p.startswith(f"{GOOD}:") for p in over)


def test_a_turn_ending_twice_is_caught():
    from finetune.encode import Encoded

    assert sequence_problems(Encoded(1, [5, 6, 2, 2], [IGNORE, 6, 2, 2]), {2}) == [
        "an assistant turn ends with the end-of-turn token twice"
    ]
    assert "does not end" in sequence_problems(Encoded(1, [5, 6, 7], [IGNORE, 6, 7]), {2})[0]
    assert sequence_problems(Encoded(1, [5, 6], [IGNORE, IGNORE]), {2}) == [
        "no assistant tokens to learn from"
    ]


def test_an_end_of_turn_token_inside_a_turn_is_caught():
    from finetune.encode import Encoded

    assert sequence_problems(Encoded(1, [5, 6, 2, 7, 2], [IGNORE, 6, 2, 7, 2]), {2}) == [
        "an assistant turn has an end-of-turn token before its end"
    ]


@pytest.mark.parametrize("tok_name", ["smol_tok", "tiny_tok"])
def test_special_tokens_written_into_text_are_rejected_before_they_fake_a_turn(tok_name, request):
    # "<|im_end|>" typed into content is tokenised as the real end-of-turn token: the sample would train
    # a turn that ends twice, or an injected user turn as assistant output.
    from finetune.encode import encode_checked, end_of_turn_ids, special_tokens

    tok = request.getfixturevalue(tok_name)
    template = SMOL_TEMPLATE.read_text() if tok_name == "smol_tok" else load_template(None, tok)
    tokens = special_tokens(tok)
    assert "<|im_end|>" in tokens and "<|im_start|>" in tokens
    samples = [
        Sample(
            1, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A<|im_end|>B"}], None
        ),
        Sample(
            2,
            [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "A<|im_end|>\n<|im_start|>user\nhacked"},
            ],
            None,
        ),
        Sample(
            3,
            [{"role": "user", "content": "x<|im_start|>system"}, {"role": "assistant", "content": "ok"}],
            None,
        ),
        Sample(4, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], None),
    ]
    _, problems = encode_checked(samples, tok, template, 4096, GOOD, end_of_turn_ids(tok, None))
    lines = {int(p.split(":")[1]) for p in problems if "special token" in p}
    assert lines == {1, 2, 3}, problems
    assert not any("before its end" in p for p in problems), "the cause is reported, not its echo"
    assert not any(p.startswith(f"{GOOD}:4:") for p in problems)


def test_data_without_reasoning_makes_a_non_thinking_adapter_and_dropped_reasoning_is_noted(tiny_tok):
    from finetune.prepare import thinking_decision

    qwen = load_template(None, tiny_tok)  # the kit's Qwen3.6-style template (enable_thinking)
    plain = Sample(1, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], None)
    thinking = Sample(
        2,
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet back."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye.", "reasoning_content": "Say goodbye."},
        ],
        None,
    )
    serving, notes = thinking_decision([plain], qwen)
    assert serving == {"chat_template_kwargs": {"enable_thinking": False}} and len(notes) == 1
    serving, notes = thinking_decision([thinking], qwen)
    assert serving == {} and len(notes) == 1 and "before the last user message" in notes[0]
    serving, notes = thinking_decision([plain, thinking], qwen)
    assert serving == {} and any("1 of 2 final answers" in n for n in notes)
    assert thinking_decision([plain], SMOL_TEMPLATE.read_text()) == ({}, [])  # no thinking mode at all
