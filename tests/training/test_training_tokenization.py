"""Label masking: only the trained assistant turns (and their end-of-turn token) carry labels."""

from __future__ import annotations

import pytest

from tests.tiny_models import make_tokenizer as build_tokenizer
from training.data import ChatExample
from training.tokenization import (
    IGNORE_INDEX,
    PaddingCollator,
    encode,
    render,
    tokenize_chat,
    tokenize_dataset,
)

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello there"},
    {"role": "user", "content": "again"},
    {"role": "assistant", "content": "ok"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_labels_cover_exactly_the_assistant_turns(tokenizer):
    ids, labels = tokenize_chat(tokenizer, CONVERSATION, [False, False, True, False, True])
    assert ids == encode(tokenizer, render(tokenizer, CONVERSATION, add_generation_prompt=False))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Build the expected labels independently: one token per byte, special tokens whole.
    expected: list[int] = []
    for message in CONVERSATION:
        header = encode(tokenizer, f"<|im_start|>{message['role']}\n")
        content = encode(tokenizer, message["content"])
        newline = encode(tokenizer, "\n")
        expected += [IGNORE_INDEX] * len(header)
        expected += content + [end] if message["role"] == "assistant" else [IGNORE_INDEX] * (len(content) + 1)
        expected += [IGNORE_INDEX] * len(newline)
    assert labels == expected
    trained = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "hello there<|im_end|>ok<|im_end|>"


def test_the_server_prompt_is_a_token_prefix_of_each_trained_turn(tokenizer):
    ids, labels = tokenize_chat(tokenizer, CONVERSATION, [False, False, True, False, True])
    for i in (2, 4):
        prompt = encode(tokenizer, render(tokenizer, CONVERSATION[:i], add_generation_prompt=True))
        assert ids[: len(prompt)] == prompt  # what the server encodes at inference
        assert labels[len(prompt) - 1] == IGNORE_INDEX and labels[len(prompt)] != IGNORE_INDEX


def test_weight_zero_turns_are_context_only(tokenizer):
    ids, labels = tokenize_chat(tokenizer, CONVERSATION, [False, False, False, False, True])
    trained = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "ok<|im_end|>"


def test_template_that_is_not_prefix_stable_is_reported(tokenizer):
    odd = build_tokenizer()
    odd.chat_template = (  # renders the last message differently from history
        "{% for m in messages %}{% if loop.last %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% else %}[{{ m['content'] }}]{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    example = ChatExample(tuple(CONVERSATION[1:3]), (False, True), line=7)
    result = tokenize_dataset(odd, [example], max_length=512, overlong="drop")
    assert result.examples == [] and result.issues[0].line == 7


def test_overlong_rows_are_dropped_or_truncated(tokenizer):
    long = ChatExample(
        ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 40}), (False, True), 1
    )
    short = ChatExample(
        ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}), (False, True), 2
    )
    dropped = tokenize_dataset(tokenizer, [long, short], max_length=30, overlong="drop")
    assert [e.line for e in dropped.examples] == [2] and dropped.dropped_overlong == 1
    truncated = tokenize_dataset(tokenizer, [long, short], max_length=30, overlong="truncate")
    assert [len(e.input_ids) for e in truncated.examples][0] == 30 and truncated.truncated == 1
    # A row whose answer would be cut away entirely is dropped even when truncating.
    nothing_left = tokenize_dataset(tokenizer, [long], max_length=10, overlong="truncate")
    assert nothing_left.examples == [] and nothing_left.dropped_overlong == 1


def test_collator_pads_right_and_masks_padding():
    batch = PaddingCollator(pad_token_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
