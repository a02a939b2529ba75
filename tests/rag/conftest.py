"""Fixtures of the RAG tests: a fast hashing embedder for most tests, the real MiniLM once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/rag has no __init__.py; fakes.py is imported by path

from fakes import HashingEmbedder  # noqa: E402

from rag.collections import CollectionManager  # noqa: E402


@pytest.fixture
def embedder() -> HashingEmbedder:
    return HashingEmbedder()


@pytest.fixture
def manager(tmp_path: Path, embedder: HashingEmbedder):
    manager = CollectionManager(
        tmp_path / "rag", load_embedder=lambda model: embedder, max_upload_bytes=64 * 1024
    )
    yield manager
    manager.close()


@pytest.fixture(scope="session")
def minilm():
    """The real default embedder (all-MiniLM-L6-v2), loaded once."""
    from rag.embedder import DEFAULT_EMBEDDING_MODEL, load_embedder

    return load_embedder(DEFAULT_EMBEDDING_MODEL)


@pytest.fixture(scope="session")
def minilm_token_spans():
    """The default model's tokenizer alone (fast to load: no torch)."""
    from tokenizers import Tokenizer

    from rag.embedder import default_model_path

    tokenizer = Tokenizer.from_file(str(default_model_path() / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return lambda text: [(s, e) for s, e in tokenizer.encode(text, add_special_tokens=False).offsets if e > s]


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF whose text layer is ``text`` (ASCII, no parentheses)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


@pytest.fixture
def pdf_bytes():
    return minimal_pdf
