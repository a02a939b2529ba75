"""The bundled example tokenized with the real default model's tokenizer and chat template."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.data import read_dataset
from training.tokenization import IGNORE_INDEX, tokenize_dataset

EXAMPLES = Path(__file__).resolve().parents[2] / "training" / "examples"


@pytest.mark.slow
def test_example_rows_mask_exactly_the_answer_and_its_end_token():
    from transformers import AutoTokenizer

    from adapters.base_model import resolve_base_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(None))
    dataset = read_dataset(EXAMPLES / "orders_train.jsonl")
    assert len(dataset.examples) == 400 and not dataset.issues
    tokenized = tokenize_dataset(tokenizer, dataset, max_length=512, overlong="drop")
    assert len(tokenized.examples) == 400 and not tokenized.issues  # the template is prefix-stable
    for row, example in zip(dataset.examples, tokenized.examples):
        trained = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
        assert tokenizer.decode(trained) == row.messages[-1]["content"] + "<|im_end|>"
    mean_tokens = tokenized.tokens / len(tokenized.examples)
    assert 50 <= mean_tokens <= 90  # "short chat examples" of the speed target
