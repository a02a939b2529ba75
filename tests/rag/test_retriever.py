"""Reciprocal-rank fusion, BM25 and the evaluation metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rag.evaluate import evaluate, format_table, load_qa
from rag.keyword import KeywordIndex, keyword_tokens
from rag.passage import Passage
from rag.retriever import reciprocal_rank_fusion


def test_rrf_rewards_agreement():
    fused = reciprocal_rank_fusion([np.array([1, 2, 3]), np.array([3, 4, 1])], k=60)
    assert [c.chunk_id for c in fused] == [1, 3, 2, 4]
    assert fused[0].score == pytest.approx(1 / 61 + 1 / 63)
    assert reciprocal_rank_fusion([np.array([], dtype=np.int64)]) == []


def test_keyword_index():
    index = KeywordIndex()
    index.add(np.array([10, 11, 12]), ["The quick brown fox", "A lazy dog sleeps", "fox and dog"])
    scores, ids = index.search("fox dog", 5)
    assert ids.tolist()[0] == 12 and set(ids.tolist()) == {10, 11, 12}
    assert index.search("fox", 5, allowed_ids=np.array([12]))[1].tolist() == [12]
    assert index.search("the and a", 5)[1].tolist() == []  # stopwords only
    index.remove(np.array([12]))
    assert index.search("fox", 5)[1].tolist() == [10]
    assert keyword_tokens("The Fox's den, 42!") == ["fox", "den", "42"]


def test_evaluate_metrics(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [
        {"question": "q1", "expected": "alpha"},
        {"question": "q2", "expected": "doc-b"},
        {"question": "q3", "expected": "zzz"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = load_qa(path)

    def search(question, top_k, mode):
        ranked = {
            "q1": [Passage(1, "doc-a", "a", "x ALPHA  y", 1.0, 0, 9)],
            "q2": [Passage(2, "doc-x", "x", "other", 1.0, 0, 5), Passage(3, "doc-b", "b", "text", 0.5, 0, 4)],
            "q3": [],
        }[question]
        return ranked[:top_k]

    [scores] = evaluate(search, items, modes=("dense",), ks=(1, 5))
    assert scores.recall_at == {1: pytest.approx(1 / 3), 5: pytest.approx(2 / 3)}
    assert scores.mrr == pytest.approx((1 + 0.5) / 3)
    assert format_table([scores]).splitlines()[2] == "| dense | 0.333 | 0.667 | 0.500 |"
    path.write_text('{"question": "no expected"}\n')
    with pytest.raises(ValueError):
        load_qa(path)
