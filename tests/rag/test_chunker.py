"""Chunk boundaries and offsets."""

from __future__ import annotations

import re

import pytest

from rag.chunker import chunk_text


def word_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"\w+|[^\w\s]", text)]


def words(n: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


def assert_exact_offsets(text: str, chunks) -> None:
    for c in chunks:
        assert text[c.start_char : c.end_char] == c.text
        assert c.text == c.text.strip()


@pytest.mark.parametrize(
    "text, size, overlap, expected_texts",
    [
        ("", 8, 0, []),
        ("   \n\n ", 8, 0, []),
        ("one two three", 8, 0, ["one two three"]),
        # Paragraph break preferred over the hard window end.
        ("a b c d e\n\nf g h i j k", 8, 0, ["a b c d e", "f g h i j k"]),
        # A heading starts a new chunk even when a later boundary would fit, and gets no overlap.
        ("a b c\n\n# H\n\nd e f g h", 8, 2, ["a b c", "# H\n\nd e f g h"]),
        # Sentence end preferred over a plain space.
        ("a b c d e. f g h i j", 8, 0, ["a b c d e.", "f g h i j"]),
    ],
)
def test_boundaries(text, size, overlap, expected_texts):
    chunks = chunk_text(text, word_spans, size, overlap)
    assert [c.text for c in chunks] == expected_texts
    assert_exact_offsets(text, chunks)


def test_window_and_overlap_without_boundaries():
    text = words(20)
    chunks = chunk_text(text, word_spans, chunk_size=8, chunk_overlap=2)
    assert [c.token_count for c in chunks] == [8, 8, 8]
    assert chunks[0].text.split()[-2:] == chunks[1].text.split()[:2]  # 2 tokens shared
    assert chunks[-1].text.endswith("w19")
    assert_exact_offsets(text, chunks)


def test_every_token_covered_and_sizes_bounded():
    text = "\n\n".join(
        f"## Section {s}\n\n" + ". ".join(words(7 + s, f"s{s}x") for _ in range(3)) for s in range(12)
    )
    chunks = chunk_text(text, word_spans, chunk_size=24, chunk_overlap=4)
    assert all(c.token_count <= 24 for c in chunks)
    covered = set()
    for c in chunks:
        covered |= {s for s, _ in word_spans(text) if c.start_char <= s < c.end_char}
    assert covered == {s for s, _ in word_spans(text)}
    assert_exact_offsets(text, chunks)
    assert [c.start_char for c in chunks] == sorted(c.start_char for c in chunks)


def test_bad_settings_raise():
    with pytest.raises(ValueError):
        chunk_text("a b", word_spans, chunk_size=8, chunk_overlap=4)


def test_real_tokenizer_offsets_and_limits(minilm_token_spans):
    text = ("# Title\n\n" + "Tokenization splits words into word pieces, unbelievably. " * 40 + "\n\n") * 3
    chunks = chunk_text(text, minilm_token_spans, chunk_size=64, chunk_overlap=8)
    assert len(chunks) > 3
    assert all(len(minilm_token_spans(c.text)) <= 64 for c in chunks)
    assert_exact_offsets(text, chunks)
    assert all(c.start_char == 0 or text[c.start_char - 1].isspace() for c in chunks)  # never inside a word
    assert sum(c.text.startswith("# Title") for c in chunks) == 3
