"""Toy training rows for the tiny model: short, learnable tasks."""

from __future__ import annotations

import json
import random
from pathlib import Path


def toy_rows(n: int, seed: int = 0, task: str = "upper") -> list[dict]:
    """Echo a 4-letter word upper-cased (``upper``) or reversed (``reverse``, a second task)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdef") for _ in range(4))
        answer = word.upper() if task == "upper" else word[::-1]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"{task} {word}"},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    """Writes rows (dicts as JSON, strings verbatim) one per line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
