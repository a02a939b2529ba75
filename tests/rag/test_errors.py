"""The RAG errors pickle intact: under Ray Serve they cross from the RAG deployment to the engine
replica, whose error table reads their class, message, ``code`` and ``param``."""

from __future__ import annotations

import pickle

import pytest

from rag import errors

EXAMPLES = [
    errors.CollectionNotFound("notes"),
    errors.CollectionExists("notes"),
    errors.CollectionNameInvalid("bad name!"),
    errors.CollectionSettingsInvalid("chunk_size", "chunk_size must be from 16 to 254, not 4"),
    errors.EmbeddingModelInvalid("/models/x", "not a local sentence-transformers directory"),
    errors.DocumentNotFound("notes", "a.md"),
    errors.EmptyDocument("a.md"),
    errors.DocumentTooLarge("a.md", 30_000_000, 20_971_520),
    errors.UnsupportedFileType("a.docx", "application/octet-stream"),
    errors.DocumentUnreadable("a.pdf", "no text layer"),
    errors.SearchInvalid("filter", "filter keys are 1-64 characters of [A-Za-z0-9_.-], not 'a b'"),
    errors.DocumentIdInvalid("a\x00b"),
]


def test_every_rag_error_has_an_example():
    classes = {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.RagError)}
    assert classes - {errors.RagError} == {type(e) for e in EXAMPLES}


@pytest.mark.parametrize("error", EXAMPLES, ids=lambda e: type(e).__name__)
def test_rag_error_survives_pickling(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert (str(copy), copy.args, copy.code, copy.param) == (str(error), error.args, error.code, error.param)
    assert copy.__dict__ == error.__dict__
