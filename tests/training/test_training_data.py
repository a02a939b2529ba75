"""Validation of training files: every problem reported with its line number, no model needed."""

from __future__ import annotations

import json
import re

import pytest

from tests.training.toy_data import write_jsonl
from training.data import DatasetError, parse_row, read_dataset, split_holdout

GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ([1, 2], "JSON object"),
        ({"text": "hi"}, "expected 'messages'"),
        ({"messages": []}, "non-empty list"),
        ({"messages": ["hi"]}, "messages[0] must be an object"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "unknown role 'tool'"),
        ({"messages": [{"role": "user", "content": 3}]}, "string 'content'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
            "empty assistant",
        ),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "user turn before"),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b", "weight": 0},
                ]
            },
            "weight 0",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b", "weight": 2},
                ]
            },
            "weight",
        ),
        ({"prompt": "q"}, "completion"),
        ({"prompt": "", "completion": "a"}, "'prompt'"),
        ({**GOOD_CHAT, "system": 5}, "'system' must be a string"),
    ],
)
def test_invalid_rows_name_the_problem(row, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_row(row)


@pytest.mark.parametrize(
    ("row", "roles", "trained"),
    [
        (GOOD_CHAT, ["user", "assistant"], [False, True]),
        ({"prompt": "q", "completion": "a"}, ["user", "assistant"], [False, True]),
        (
            {"prompt": "q", "completion": "a", "system": "s"},
            ["system", "user", "assistant"],
            [False, False, True],
        ),
        (
            {
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b", "weight": 0},
                    {"role": "user", "content": "c"},
                    {"role": "assistant", "content": "d"},
                ]
            },
            ["system", "user", "assistant", "user", "assistant"],
            [False, False, False, False, True],
        ),
    ],
)
def test_valid_rows(row, roles, trained):
    messages, flags = parse_row(row)
    assert [m["role"] for m in messages] == roles
    assert flags == trained


def test_invalid_rows_are_skipped_with_line_numbers(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [GOOD_CHAT, "{not json", "", {"messages": [{"role": "bot", "content": "x"}]}]
    )
    dataset = read_dataset(path)
    assert [e.line for e in dataset.examples] == [1]
    assert [(i.line, i.message.split(" (")[0]) for i in dataset.issues] == [
        (2, "malformed JSON"),
        (4, "messages[0] has unknown role 'bot'"),
    ]
    assert dataset.summary()["invalid_rows"] == 2


def test_strict_makes_any_invalid_row_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD_CHAT, "{not json"])
    with pytest.raises(DatasetError, match=r"d.jsonl:2: malformed JSON"):
        read_dataset(path, strict=True)


@pytest.mark.parametrize(
    ("content", "message"), [("", "no rows"), ("\n\n", "no rows"), ("{}\n[]\n", "no valid row")]
)
def test_empty_or_wholly_invalid_files_are_errors(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        read_dataset(path)


def test_hash_covers_the_bytes(tmp_path):
    import hashlib

    path = write_jsonl(tmp_path / "d.jsonl", [GOOD_CHAT])
    assert read_dataset(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_holdout_is_seeded_and_disjoint(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(50)]
    examples = read_dataset(write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])).examples
    train_a, held_a = split_holdout(examples, 0.1, seed=3)
    train_b, held_b = split_holdout(examples, 0.1, seed=3)
    assert held_a == held_b and len(held_a) == 5 and len(train_a) == 45
    assert not {e.line for e in train_a} & {e.line for e in held_a}
    assert split_holdout(examples[:4], 0.5, seed=3)[1] == []  # too few rows to hold any out
