"""Dense, keyword and hybrid retrieval over one collection's indexes.

Hybrid search fuses the dense and keyword rankings by reciprocal-rank fusion (Cormack, Clarke & Büttcher,
SIGIR 2009: https://plg.uwaterloo.ca/~gvcormac/cormacksigir09-rrf.pdf): ``score = Σ 1 / (k + rank)`` over
the rankings that contain a chunk, with k = 60. Each ranking is fetched ``CANDIDATES_FACTOR`` times deeper
than ``top_k`` so that fusion has something to reorder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rag.embedder import Embedder
from rag.errors import SearchInvalid
from rag.index import VectorIndex
from rag.keyword import KeywordIndex

SEARCH_MODES = ("dense", "keyword", "hybrid")
DEFAULT_MODE = "hybrid"
RRF_K = 60
CANDIDATES_FACTOR = 4
MIN_CANDIDATES = 20
MAX_TOP_K = 100


@dataclass(frozen=True)
class ScoredChunk:
    chunk_id: int
    score: float


def check_search(mode: str, top_k: int) -> None:
    """Raises :class:`SearchInvalid` for an unknown mode or a top_k outside 1..MAX_TOP_K."""
    if mode not in SEARCH_MODES:
        raise SearchInvalid("mode", f"mode must be one of {', '.join(SEARCH_MODES)}, not {mode!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise SearchInvalid("top_k", f"top_k must be an integer from 1 to {MAX_TOP_K}, not {top_k!r}")


def reciprocal_rank_fusion(rankings: list[np.ndarray], k: int = RRF_K) -> list[ScoredChunk]:
    """Fuses rankings of chunk ids (best first) into one, best first; ties keep first-seen order."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, chunk_id in enumerate(ranking.tolist(), start=1):
            scores[chunk_id] = scores.get(chunk_id, 0.0) + 1.0 / (k + rank)
    return [ScoredChunk(i, s) for i, s in sorted(scores.items(), key=lambda kv: -kv[1])]


class Retriever:
    """Ranks chunk ids for a query with one collection's embedder, vector index and BM25 index."""

    def __init__(self, embedder: Embedder, vectors: VectorIndex, keywords: KeywordIndex):
        self.embedder = embedder
        self.vectors = vectors
        self.keywords = keywords

    def rank(
        self, query: str, top_k: int, mode: str = DEFAULT_MODE, allowed_ids: np.ndarray | None = None
    ) -> list[ScoredChunk]:
        """The ``top_k`` best chunks for ``query`` in ``mode``, optionally only among ``allowed_ids``."""
        check_search(mode, top_k)
        if mode == "dense":
            scores, ids = self.dense(query, top_k, allowed_ids)
        elif mode == "keyword":
            scores, ids = self.keywords.search(query, top_k, allowed_ids)
        else:
            depth = max(MIN_CANDIDATES, CANDIDATES_FACTOR * top_k)
            _, dense_ids = self.dense(query, depth, allowed_ids)
            _, keyword_ids = self.keywords.search(query, depth, allowed_ids)
            return reciprocal_rank_fusion([dense_ids, keyword_ids])[:top_k]
        return [ScoredChunk(int(i), float(s)) for s, i in zip(scores, ids)]

    def dense(self, query: str, k: int, allowed_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        query_vector = self.embedder.encode([query])[0]  # (d,)
        return self.vectors.search(query_vector, k, allowed_ids)
