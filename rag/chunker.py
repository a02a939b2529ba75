"""Splitting documents into overlapping chunks measured in the embedding model's tokens.

A chunk holds at most ``chunk_size`` tokens. Within each window the split goes to the strongest boundary
available in the window's last three quarters, in this order: a Markdown heading, a paragraph break (blank
line), a line break, a sentence end, a space; only a single word longer than the window is cut mid-word.
Consecutive chunks share ``chunk_overlap`` tokens, except when the next chunk starts at a heading (a new
section needs no tail of the previous one). Every chunk is an exact slice ``text[start_char:end_char]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_CHUNK_SIZE = 200
DEFAULT_CHUNK_OVERLAP = 32

# Boundary strengths before a token (higher splits first).
_NONE, _SPACE, _SENTENCE, _LINE, _PARAGRAPH, _HEADING = range(6)
_SENTENCE_ENDS = (".", "!", "?", ":", ";")


@dataclass(frozen=True)
class Chunk:
    """One piece of a document, with its place in the document's text."""

    text: str
    start_char: int
    end_char: int
    token_count: int


def _boundary_strength(text: str, spans: list[tuple[int, int]], i: int) -> int:
    """How good a place it is to start a new chunk at token ``i`` (``i`` > 0)."""
    gap = text[spans[i - 1][1] : spans[i][0]]
    if "\n" in gap:
        if text[spans[i][0]] == "#":
            return _HEADING
        return _PARAGRAPH if gap.count("\n") >= 2 else _LINE
    if not gap:
        return _NONE
    if text[spans[i - 1][0] : spans[i - 1][1]].endswith(_SENTENCE_ENDS):
        return _SENTENCE
    return _SPACE


def _window_end(strengths: list[int], start: int, n_tokens: int, chunk_size: int) -> int:
    """The token index at which the chunk starting at ``start`` ends (exclusive)."""
    hard_end = min(start + chunk_size, n_tokens)
    if hard_end == n_tokens:
        return n_tokens
    earliest = start + max(1, chunk_size // 4)
    best, best_strength = hard_end, _NONE
    for i in range(hard_end, earliest - 1, -1):  # latest position wins ties
        if strengths[i] > best_strength:
            best, best_strength = i, strengths[i]
            if best_strength == _HEADING:
                break
    return best


def chunk_text(
    text: str,
    token_spans: Callable[[str], list[tuple[int, int]]],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
) -> list[Chunk]:
    """Splits ``text`` into chunks of at most ``chunk_size`` tokens.

    Args:
        text: the document's text.
        token_spans: the embedding tokenizer's (start, end) character span of each token.
        chunk_size: the most tokens in one chunk.
        chunk_overlap: tokens shared by consecutive chunks of one section; less than ``chunk_size // 2``.

    Returns:
        The chunks in document order; empty if the text has no tokens.
    """
    if chunk_size < 1 or not 0 <= chunk_overlap < max(1, chunk_size // 2):
        raise ValueError(f"bad chunking: chunk_size={chunk_size}, chunk_overlap={chunk_overlap}")
    spans = token_spans(text)
    n_tokens = len(spans)
    strengths = [_HEADING] + [_boundary_strength(text, spans, i) for i in range(1, n_tokens)] + [_HEADING]
    chunks: list[Chunk] = []
    start = 0
    while start < n_tokens:
        end = _window_end(strengths, start, n_tokens, chunk_size)
        start_char, end_char = spans[start][0], spans[end - 1][1]
        chunks.append(Chunk(text[start_char:end_char], start_char, end_char, end - start))
        if end == n_tokens:
            break
        next_start = end if strengths[end] == _HEADING else end - chunk_overlap
        # Overlap starts on a word, not inside one.
        while next_start < end and strengths[next_start] == _NONE:
            next_start += 1
        start = max(next_start, start + 1)
    return chunks
