"""Passages put into the chat prompt within a token budget."""

from __future__ import annotations

import pytest

from rag.passage import Passage
from rag.prompt import RAG_INSTRUCTION, build_rag_messages, last_user_text


def passage(n: int, words: int = 10) -> Passage:
    return Passage(n, f"doc{n}", f"doc{n}.md", " ".join([f"fact{n}"] * words), 1.0 / n, 0, words * 6)


def count_words(text: str) -> int:
    return len(text.split())


MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "What is fact1?"},
]


def test_passages_are_numbered_into_the_last_user_message():
    passages = [passage(1), passage(2), passage(3)]
    messages, used = build_rag_messages(MESSAGES, passages, count_words, budget_tokens=1000)
    assert used == passages
    content = messages[-1]["content"]
    assert content.startswith(RAG_INSTRUCTION) and content.endswith("Question: What is fact1?")
    assert "[n]" in content
    for n, p in enumerate(passages, start=1):
        assert f"[{n}] (source: {p.source})\n{p.text}" in content
    assert content.index("[1]") < content.index("[2]") < content.index("[3]")
    assert messages[:-1] == MESSAGES[:-1]
    assert MESSAGES[-1]["content"] == "What is fact1?"  # the input is not modified


FRAME_WORDS = count_words(RAG_INSTRUCTION) + 1  # + "Question:"
BLOCK_WORDS = 13  # "[n] (source: docN.md)" + 10 words


@pytest.mark.parametrize(
    "budget, expected_count",
    [
        (1000, 4),
        (FRAME_WORDS + 3 * BLOCK_WORDS, 3),
        (FRAME_WORDS + 3 * BLOCK_WORDS - 1, 2),
        (FRAME_WORDS + BLOCK_WORDS, 1),
        (FRAME_WORDS + BLOCK_WORDS - 1, 0),
    ],
)
def test_budget_drops_lowest_ranked_first(budget, expected_count):
    passages = [passage(n) for n in range(1, 5)]
    messages, used = build_rag_messages(MESSAGES, passages, count_words, budget)
    assert used == passages[:expected_count]
    added = count_words(messages[-1]["content"]) - count_words("What is fact1?")
    assert added <= budget or not used
    if not used:
        assert messages == MESSAGES


def test_no_user_message_leaves_messages_alone():
    messages = [{"role": "system", "content": "hi"}]
    assert build_rag_messages(messages, [passage(1)], count_words, 100) == (messages, [])


def test_content_parts_get_a_leading_text_part():
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is fact1?"}]}]
    out, used = build_rag_messages(messages, [passage(1)], count_words, 100)
    assert used == [passage(1)]
    parts = out[-1]["content"]
    assert parts[0]["type"] == "text" and "[1] (source: doc1.md)" in parts[0]["text"]
    assert parts[0]["text"].endswith("Question:") and parts[1] == messages[0]["content"][0]
    assert last_user_text(messages) == "What is fact1?"


def test_source_entry_carries_number_ids_and_score():
    source = passage(2).to_source(1)
    assert source["index"] == 1 and source["chunk_id"] == 2 and source["document_id"] == "doc2"
    assert source["score"] == 0.5 and {"text", "source", "start_char", "end_char", "metadata"} <= set(source)
