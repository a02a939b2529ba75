"""Reading and validating JSONL training data, before any model is loaded.

Two row formats are accepted, one JSON object per line:

- OpenAI's chat fine-tuning format: ``{"messages": [{"role": ..., "content": ...}, ...]}`` with roles
  ``system``, ``user`` and ``assistant``; an assistant message may carry ``"weight": 0`` to be kept as
  context but not trained on. An optional top-level ``"system"`` string is prepended as a system message.
- Prompt/completion pairs: ``{"prompt": ..., "completion": ...}`` (optional ``"system"``), read as one
  user turn and one assistant turn.

Every problem is reported with its line number. Invalid rows are skipped (or, with ``strict``, make the
file an error); a file with no valid row is always an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
MAX_REPORTED_ISSUES = 20


@dataclass(frozen=True)
class DataIssue:
    """One problem in one line of a data file."""

    path: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class DatasetError(ValueError):
    """A data file that cannot be trained on; ``issues`` lists the problems found (with line numbers)."""

    def __init__(self, path: Path, message: str, issues: list[DataIssue] | None = None):
        self.path = Path(path)
        self.issues = issues or []
        lines = [f"{path}: {message}"] + [f"  {issue}" for issue in self.issues[:MAX_REPORTED_ISSUES]]
        if len(self.issues) > MAX_REPORTED_ISSUES:
            lines.append(f"  … and {len(self.issues) - MAX_REPORTED_ISSUES} more")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class ChatExample:
    """One valid row: a conversation, and which of its assistant turns the loss covers."""

    messages: tuple[dict, ...]  # {"role", "content"} only
    trained: tuple[bool, ...]  # per message: True for assistant turns that contribute to the loss
    line: int

    def prompt_and_reference(self) -> tuple[list[dict], str]:
        """The conversation up to its last assistant turn, and that turn's text (for evaluation)."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return [dict(m) for m in self.messages[:last]], self.messages[last]["content"]


@dataclass
class Dataset:
    """The valid rows of one file, with what was skipped and a content hash for the training card."""

    path: Path
    examples: list[ChatExample]
    issues: list[DataIssue] = field(default_factory=list)
    sha256: str = ""
    lines: int = 0

    def summary(self) -> dict:
        return {
            "path": str(self.path.resolve()),
            "sha256": self.sha256,
            "lines": self.lines,
            "valid_rows": len(self.examples),
            "invalid_rows": len(self.issues),
        }


def _check_messages(raw: object) -> tuple[list[dict], list[bool]]:
    """Validates a ``messages`` list; raises ``ValueError`` with a message naming the bad part."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("'messages' must be a non-empty list")
    messages: list[dict] = []
    trained: list[bool] = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}] has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}] ({role}) needs a string 'content'")
        weight = message.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise ValueError(f"messages[{i}] has weight {weight!r} (expected 0 or 1)")
        if role == "assistant" and not content.strip():
            raise ValueError(f"messages[{i}] is an empty assistant turn")
        messages.append({"role": role, "content": content})
        trained.append(role == "assistant" and weight == 1)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant turn")
    if not any(trained):
        raise ValueError("every assistant turn has weight 0: nothing to train on")
    if messages[0]["role"] == "assistant" or all(m["role"] != "user" for m in messages):
        raise ValueError("the conversation needs a user turn before the first assistant turn")
    return messages, trained


def parse_row(row: object) -> tuple[list[dict], list[bool]]:
    """Turns one decoded JSON row into (messages, trained flags); raises ``ValueError`` if invalid."""
    if not isinstance(row, dict):
        raise ValueError("each line must be a JSON object")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError("'system' must be a string")
    if "messages" in row:
        messages, trained = _check_messages(row["messages"])
    elif "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("'prompt' must be a non-empty string")
        if not isinstance(completion, str) or not completion.strip():
            raise ValueError("missing or empty 'completion' (the assistant turn)")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        trained = [False, True]
    else:
        raise ValueError("expected 'messages' (chat format) or 'prompt' and 'completion'")
    if system is not None:
        if messages[0]["role"] == "system":
            raise ValueError("both a top-level 'system' and a system message")
        messages, trained = [{"role": "system", "content": system}, *messages], [False, *trained]
    return messages, trained


def read_dataset(path: Path, strict: bool = False) -> Dataset:
    """Reads and validates a JSONL file.

    Args:
        path: the file.
        strict: make any invalid row an error instead of skipping it.

    Raises:
        DatasetError: the file is unreadable, empty, wholly invalid, or (``strict``) partly invalid.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(path, f"cannot read the file ({e})") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(path, f"not UTF-8 text ({e})") from e
    dataset = Dataset(path=path, examples=[], sha256=hashlib.sha256(raw).hexdigest())
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        dataset.lines += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            dataset.issues.append(DataIssue(path, line_no, f"malformed JSON ({e.msg} at column {e.colno})"))
            continue
        try:
            messages, trained = parse_row(row)
        except ValueError as e:
            dataset.issues.append(DataIssue(path, line_no, str(e)))
            continue
        dataset.examples.append(ChatExample(tuple(messages), tuple(trained), line_no))
    if dataset.lines == 0:
        raise DatasetError(path, "the file holds no rows")
    if not dataset.examples:
        raise DatasetError(path, "no valid row", dataset.issues)
    if dataset.issues:
        if strict:
            raise DatasetError(path, f"{len(dataset.issues)} invalid rows (--strict)", dataset.issues)
        logger.warning(
            "%s: skipping %d invalid rows of %d:\n%s",
            path,
            len(dataset.issues),
            dataset.lines,
            "\n".join(f"  {issue}" for issue in dataset.issues[:MAX_REPORTED_ISSUES]),
        )
    return dataset


def split_holdout(
    examples: list[ChatExample], fraction: float, seed: int
) -> tuple[list[ChatExample], list[ChatExample]]:
    """A seeded (train, held-out) split; nothing is held out from fewer than 5 rows or at fraction 0."""
    if fraction <= 0 or len(examples) < 5:
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(examples)))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [
        e for i, e in enumerate(examples) if i in held
    ]
