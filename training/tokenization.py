"""Turning conversations into (input_ids, labels) exactly as the server tokenizes prompts.

The server renders ``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`` and
encodes that text with ``tokenizer(text, add_special_tokens=False)``. Here the whole conversation is
rendered and encoded the same way, and for every trained assistant turn *i*:

- the server's prompt for that turn (messages ``[:i]`` with the generation prompt) must encode to a
  token prefix of the conversation — so the model is trained on the very tokens it will be served;
- the labels are the tokens after that prefix up to the end of the rendered turn (its text plus the
  template's end-of-turn token, trailing whitespace excluded), i.e. what the model must generate,
  stop token included. Every other position is ``IGNORE_INDEX``.

A template that renders history differently from a prompt (the prefix test fails) makes the row
invalid, reported with its line number, rather than silently training on tokens the server never sees.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from training.data import ChatExample, DataIssue, Dataset

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


class ChatTemplateMismatch(ValueError):
    """The chat template does not render a prompt as a prefix of the conversation."""


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where the loss does not look
    line: int

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class TokenizedSet:
    """The tokenized rows of a dataset, with what was dropped or truncated and why."""

    examples: list[TokenizedExample]
    issues: list[DataIssue] = field(default_factory=list)
    dropped_overlong: int = 0
    truncated: int = 0

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    def summary(self) -> dict:
        return {
            "rows": len(self.examples),
            "tokens": self.tokens,
            "trained_tokens": sum(e.trained_tokens for e in self.examples),
            "dropped_overlong": self.dropped_overlong,
            "truncated": self.truncated,
            "template_mismatches": len(self.issues),
        }


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The chat template's text, exactly as the server renders it."""
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of rendered text, exactly as the server encodes it (no extra special tokens)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_chat(tokenizer, messages: list[dict], trained: list[bool]) -> tuple[list[int], list[int]]:
    """Encodes one conversation and masks every token outside the trained assistant turns.

    Raises:
        ChatTemplateMismatch: a turn's prompt is not a token prefix of the conversation.
    """
    messages = list(messages)
    input_ids = encode(tokenizer, render(tokenizer, messages, add_generation_prompt=False))
    labels = [IGNORE_INDEX] * len(input_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or not trained[i]:
            continue
        prompt_ids = encode(tokenizer, render(tokenizer, messages[:i], add_generation_prompt=True))
        turn_ids = encode(
            tokenizer, render(tokenizer, messages[: i + 1], add_generation_prompt=False).rstrip()
        )
        if input_ids[: len(prompt_ids)] != prompt_ids:
            raise ChatTemplateMismatch(
                f"the prompt for messages[{i}] does not tokenize as a prefix of the row"
            )
        if input_ids[: len(turn_ids)] != turn_ids or len(turn_ids) <= len(prompt_ids):
            raise ChatTemplateMismatch(
                f"the assistant turn messages[{i}] does not tokenize as a span of the row"
            )
        labels[len(prompt_ids) : len(turn_ids)] = input_ids[len(prompt_ids) : len(turn_ids)]
    return input_ids, labels


def tokenize_dataset(
    tokenizer, dataset: Dataset | list[ChatExample], max_length: int, overlong: str
) -> TokenizedSet:
    """Tokenizes every row; rows over ``max_length`` are dropped or truncated (``overlong``).

    A truncated row that keeps no trained token is dropped too; both counts are reported.
    """
    examples = dataset.examples if isinstance(dataset, Dataset) else dataset
    path = dataset.path if isinstance(dataset, Dataset) else None
    result = TokenizedSet(examples=[])
    for example in examples:
        try:
            input_ids, labels = tokenize_chat(tokenizer, list(example.messages), list(example.trained))
        except ChatTemplateMismatch as e:
            result.issues.append(DataIssue(path, example.line, str(e)))
            continue
        if len(input_ids) > max_length:
            if overlong == "drop" or all(label == IGNORE_INDEX for label in labels[:max_length]):
                result.dropped_overlong += 1
                continue
            input_ids, labels = input_ids[:max_length], labels[:max_length]
            result.truncated += 1
        result.examples.append(TokenizedExample(input_ids, labels, example.line))
    if result.dropped_overlong or result.truncated:
        logger.warning(
            "%s: %d rows over %d tokens dropped, %d truncated (--overlong %s)",
            path or "data",
            result.dropped_overlong,
            max_length,
            result.truncated,
            overlong,
        )
    if result.issues:
        logger.warning(
            "%s: %d rows skipped (chat template mismatch):\n%s",
            path or "data",
            len(result.issues),
            "\n".join(f"  {issue}" for issue in result.issues[:20]),
        )
    return result


class TokenizedDataset(torch.utils.data.Dataset):
    """A map-style dataset over tokenized rows, for ``Trainer``."""

    def __init__(self, examples: list[TokenizedExample]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        return {"input_ids": example.input_ids, "labels": example.labels}


@dataclass
class PaddingCollator:
    """Right-pads a batch; padded positions get ``IGNORE_INDEX`` labels and a zero attention mask."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[b, :n] = torch.tensor(row["input_ids"])
            labels[b, :n] = torch.tensor(row["labels"])
            attention_mask[b, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
