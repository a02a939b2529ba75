"""Keyword search over a collection's chunks: BM25 (Okapi, via ``bm25s``).

The BM25 matrix lives in memory and is rebuilt from cached token lists when the chunk set has changed
since the last search (lazily, so that a burst of ingests costs one rebuild). SQLite holds the texts, so
nothing here needs persisting.
"""

from __future__ import annotations

import logging
import re
import sys
import threading

import bm25s
import numpy as np

logger = logging.getLogger(__name__)

_TOKEN_RE = re.compile(r"(?u)\b\w\w+\b")
_STOPWORDS = frozenset(bm25s.stopwords.STOPWORDS_EN)


def keyword_tokens(text: str) -> list[str]:
    """Lower-cased words of two or more characters, English stopwords removed."""
    # Interned: the cache holds every chunk's tokens, and most are repeats of a small vocabulary.
    return [sys.intern(t) for t in _TOKEN_RE.findall(text.lower()) if t not in _STOPWORDS]


class KeywordIndex:
    """BM25 over chunk ids; thread-safe."""

    def __init__(self) -> None:
        self._tokens: dict[int, list[str]] = {}
        self._lock = threading.Lock()
        self._bm25: bm25s.BM25 | None = None
        self._row_ids = np.zeros(0, dtype=np.int64)  # BM25 row -> chunk id
        self._dirty = True

    @property
    def count(self) -> int:
        return len(self._tokens)

    def add(self, ids: np.ndarray, texts: list[str]) -> None:
        with self._lock:
            for chunk_id, text in zip(ids.tolist(), texts):
                self._tokens[chunk_id] = keyword_tokens(text)
            self._dirty = True

    def remove(self, ids: np.ndarray) -> None:
        with self._lock:
            for chunk_id in ids.tolist():
                self._tokens.pop(chunk_id, None)
            self._dirty = True

    def _rebuild(self) -> None:
        self._row_ids = np.array(sorted(self._tokens), dtype=np.int64)
        if not len(self._row_ids):
            self._bm25 = None
        else:
            self._bm25 = bm25s.BM25()
            self._bm25.index([self._tokens[i] for i in self._row_ids.tolist()], show_progress=False)
        self._dirty = False
        logger.debug("rebuilt BM25 over %d chunks", len(self._row_ids))

    def search(
        self, query: str, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best-scoring chunks for ``query`` (only those sharing a word with it).

        Returns:
            (scores, ids), each (≤k,), best first.
        """
        terms = keyword_tokens(query)
        with self._lock:
            if self._dirty:
                self._rebuild()
            bm25, row_ids = self._bm25, self._row_ids
        if bm25 is None or not terms:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
        scores = bm25.get_scores(terms)  # (N,)
        if allowed_ids is not None:
            scores = np.where(np.isin(row_ids, allowed_ids), scores, 0.0)
        hits = np.flatnonzero(scores > 0)
        if len(hits) > k:
            hits = hits[np.argpartition(-scores[hits], k - 1)[:k]]
        hits = hits[np.argsort(-scores[hits], kind="stable")]
        return scores[hits].astype(np.float32), row_ids[hits]
