"""``loraplex rag ingest | search | eval | list | delete`` with the hashing embedder."""

from __future__ import annotations

import functools
import json

import pytest

import rag.cli
from rag.collections import CollectionManager


@pytest.fixture
def cli(monkeypatch, embedder, tmp_path):
    monkeypatch.setattr(
        rag.cli,
        "CollectionManager",
        functools.partial(CollectionManager, load_embedder=lambda model: embedder),
    )
    monkeypatch.setenv("LORAPLEX_DATA_DIR", str(tmp_path / "data"))
    return rag.cli.main


def test_ingest_search_eval(cli, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "otters.md").write_text("# Otters\n\nOtters hold hands while they sleep.")
    (corpus / "sub" / "herons.html").write_text("<h1>Herons</h1><p>Herons stand still in water.</p>")
    (corpus / "image.png").write_bytes(b"\x89PNG")  # not a supported type: ignored without --glob

    assert cli(["ingest", "animals", str(corpus)]) == 0
    out = capsys.readouterr().out
    assert "created collection animals" in out and "2 created" in out
    assert cli(["ingest", "animals", str(corpus), "--glob", "*.md"]) == 0
    assert "1 unchanged" in capsys.readouterr().out

    assert cli(["search", "animals", "herons water", "--mode", "keyword", "--top-k", "1"]) == 0
    assert "herons.html" in capsys.readouterr().out

    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "Which animal holds hands?", "expected": "hold hands"}) + "\n")
    assert cli(["eval", "animals", "--data", str(qa)]) == 0
    table = capsys.readouterr().out
    assert "| mode | recall@1 | recall@5 | recall@10 | MRR@10 |" in table and "| hybrid |" in table

    assert cli(["list"]) == 0
    assert "animals: 2 documents" in capsys.readouterr().out
    assert cli(["delete", "animals"]) == 0
    assert cli(["search", "animals", "x"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_ingest_reports_bad_files(cli, tmp_path, capsys):
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 broken")
    (tmp_path / "ok.txt").write_text("fine text")
    assert cli(["ingest", "c", str(tmp_path / "broken.pdf"), str(tmp_path / "ok.txt")]) == 1
    captured = capsys.readouterr()
    assert "skipped" in captured.out + captured.err and "1 created" in captured.out
