"""A retrieved chunk as the retriever returns it and as responses list it in ``sources``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Passage:
    """One retrieved chunk.

    ``score`` depends on the search mode: cosine similarity (dense), BM25 (keyword) or the reciprocal-rank
    fusion score (hybrid); higher is better within one result list.
    """

    chunk_id: int
    document_id: str
    source: str
    text: str
    score: float
    start_char: int
    end_char: int
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The JSON form used by the search endpoint."""
        return {
            "chunk_id": self.chunk_id,
            "document_id": self.document_id,
            "source": self.source,
            "text": self.text,
            "score": self.score,
            "start_char": self.start_char,
            "end_char": self.end_char,
            "metadata": self.metadata,
        }

    def to_source(self, number: int) -> dict:
        """The JSON form of the ``sources`` list of a chat response; ``number`` is the [n] cited."""
        return {"index": number, **self.to_dict()}
