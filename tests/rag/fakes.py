"""A fast, deterministic stand-in for the sentence-transformers embedder.

Words are hashed into a fixed number of buckets (a normalised bag of words), so texts sharing words are
similar and searches behave predictably without loading a model.
"""

from __future__ import annotations

import re
import threading
import zlib

import numpy as np

_WORD_RE = re.compile(r"\w+|[^\w\s]")


class HashingEmbedder:
    """Bag-of-words vectors with hashed buckets; tokens are words and punctuation marks."""

    name = "hashing"

    def __init__(self, dimension: int = 64, max_tokens: int = 254):
        self.dimension = dimension
        self.max_tokens = max_tokens
        self.encoded_texts = 0
        self._lock = threading.Lock()

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in _WORD_RE.finditer(text)]

    def encode(self, texts: list[str]) -> np.ndarray:
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)  # (N, d)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                vectors[row, zlib.crc32(word.encode()) % self.dimension] += 1.0
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        with self._lock:
            self.encoded_texts += len(texts)
        return vectors / np.maximum(norms, 1e-12)
