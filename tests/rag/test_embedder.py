"""The real default embedder (all-MiniLM-L6-v2) and retrieval quality on the bundled corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rag.collection import DocumentInput
from rag.collections import CollectionManager
from rag.evaluate import evaluate, load_qa
from rag.extract import extract_text

EXAMPLES = Path(__file__).parents[2] / "rag" / "examples"


def test_vectors_are_normalised_and_semantic(minilm):
    vectors = minilm.encode(
        ["A cat sits on the mat.", "A kitten rests on a rug.", "Stock prices fell sharply."]
    )
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    assert minilm.max_tokens == 254
    assert minilm.token_spans("Hello, world")[:2] == [(0, 5), (5, 6)]


def test_dense_search_finds_paraphrases(tmp_path, minilm):
    manager = CollectionManager(tmp_path, load_embedder=lambda model: minilm)
    try:
        manager.create("kb")
        manager.ingest(
            "kb",
            [
                DocumentInput("Felines enjoy sleeping in warm sunny spots for most of the day.", id="cats"),
                DocumentInput("The central bank raised interest rates to curb inflation.", id="economy"),
                DocumentInput(
                    "Photosynthesis turns light, water and carbon dioxide into sugar.", id="plants"
                ),
            ],
        )
        assert manager.retrieve("kb", "Where do cats like to nap?", 1, "dense")[0].document_id == "cats"
        assert manager.retrieve("kb", "How do plants make food?", 1, "hybrid")[0].document_id == "plants"
    finally:
        manager.close()


@pytest.mark.slow
def test_bundled_corpus_hybrid_beats_dense(tmp_path, minilm):
    manager = CollectionManager(tmp_path, load_embedder=lambda model: minilm)
    try:
        manager.create("examples")
        files = sorted((EXAMPLES / "corpus").iterdir())
        documents = [DocumentInput(extract_text(f.read_bytes(), f.name), source=f.name) for f in files]
        manager.ingest("examples", documents)
        scores = {s.mode: s for s in evaluate(manager.get("examples").search, load_qa(EXAMPLES / "qa.jsonl"))}
    finally:
        manager.close()
    assert scores["hybrid"].mrr > scores["dense"].mrr
    assert scores["hybrid"].recall_at[10] >= scores["dense"].recall_at[10] >= 0.85
