"""Retrieval quality on a QA set: recall@k and MRR per search mode.

A QA row is ``{"question": ..., "expected": ...}``; a retrieved passage is relevant when ``expected`` is its
document id or a substring of its text (case and runs of whitespace ignored). recall@k is the share of
questions with a relevant passage among the first k; MRR is the mean of 1/rank of the first relevant
passage within the deepest k (0 when there is none).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rag.passage import Passage
from rag.retriever import SEARCH_MODES

DEFAULT_KS = (1, 5, 10)


@dataclass(frozen=True)
class QAItem:
    question: str
    expected: str


@dataclass
class ModeScores:
    """Retrieval quality of one search mode."""

    mode: str
    questions: int
    recall_at: dict[int, float] = field(default_factory=dict)
    mrr: float = 0.0


def load_qa(path: Path) -> list[QAItem]:
    """Reads a JSONL QA file; blank lines are skipped.

    Raises:
        ValueError: a row without a non-empty ``question`` and ``expected``.
    """
    items = []
    for line_number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not (isinstance(row, dict) and row.get("question") and row.get("expected")):
            raise ValueError(f"{path}:{line_number}: rows need non-empty 'question' and 'expected'")
        items.append(QAItem(str(row["question"]), str(row["expected"])))
    return items


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def is_relevant(passage: Passage, expected: str) -> bool:
    return passage.document_id == expected or _normalize(expected) in _normalize(passage.text)


def first_relevant_rank(passages: list[Passage], expected: str) -> int | None:
    """The 1-based rank of the first relevant passage, or None."""
    return next((rank for rank, p in enumerate(passages, start=1) if is_relevant(p, expected)), None)


def evaluate(
    search: Callable[[str, int, str], list[Passage]],
    items: list[QAItem],
    modes: tuple[str, ...] = SEARCH_MODES,
    ks: tuple[int, ...] = DEFAULT_KS,
) -> list[ModeScores]:
    """Scores each mode on ``items``.

    Args:
        search: ``search(question, top_k, mode)``, e.g. a bound ``Collection.search``.
        items: the QA set.
        modes: the search modes to score.
        ks: the cut-offs of recall@k; the deepest one is also MRR's.
    """
    depth = max(ks)
    results = []
    for mode in modes:
        ranks = [first_relevant_rank(search(item.question, depth, mode), item.expected) for item in items]
        n = max(1, len(items))
        recall = {k: sum(r is not None and r <= k for r in ranks) / n for k in ks}
        mrr = sum(1.0 / r for r in ranks if r is not None) / n
        results.append(ModeScores(mode, len(items), recall, mrr))
    return results


def format_table(scores: list[ModeScores]) -> str:
    """A Markdown table: one row per mode, recall@k columns and MRR."""
    ks = sorted(scores[0].recall_at) if scores else list(DEFAULT_KS)
    header = "| mode | " + " | ".join(f"recall@{k}" for k in ks) + f" | MRR@{ks[-1]} |"
    rule = "|---|" + "---:|" * (len(ks) + 1)
    rows = [
        f"| {s.mode} | " + " | ".join(f"{s.recall_at[k]:.3f}" for k in ks) + f" | {s.mrr:.3f} |"
        for s in scores
    ]
    return "\n".join([header, rule, *rows])
