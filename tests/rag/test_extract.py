"""Text extraction from uploaded files."""

from __future__ import annotations

import pytest

from rag.errors import DocumentUnreadable, UnsupportedFileType
from rag.extract import extract_text
from server.api.errors import status_for


@pytest.mark.parametrize(
    "filename, content_type, data, expected",
    [
        ("a.txt", None, b"plain text", "plain text"),
        ("a.md", None, "\ufeff# Title\n\nbody é".encode(), "# Title\n\nbody é"),
        ("noext", "text/markdown; charset=utf-8", b"# T", "# T"),
        ("latin.txt", None, "caf\xe9".encode("latin-1"), "caf\xe9"),
        (
            "page.html",
            None,
            b"<html><head><title>x</title><style>p{}</style></head><body><h1>Main</h1><p>First para.</p>"
            b"<script>alert(1)</script><h2>Sub</h2><ul><li>one</li><li>two</li></ul></body></html>",
            "# Main\n\nFirst para.\n\n## Sub\n\none\n\ntwo",
        ),
    ],
)
def test_extract(filename, content_type, data, expected):
    assert extract_text(data, filename, content_type) == expected


def test_pdf(pdf_bytes):
    assert extract_text(pdf_bytes("Pelicans fly in lines"), "doc.pdf") == "Pelicans fly in lines"


@pytest.mark.parametrize("data", [b"%PDF-1.4 truncated", b"not a pdf at all", b""])
def test_broken_pdf_raises(data):
    with pytest.raises(DocumentUnreadable):
        extract_text(data, "broken.pdf")


@pytest.mark.parametrize(
    "filename, content_type", [("a.docx", None), ("image.png", "image/png"), ("x", None)]
)
def test_unsupported_type_raises(filename, content_type):
    with pytest.raises(UnsupportedFileType) as e:
        extract_text(b"data", filename, content_type)
    assert status_for(e.value) == 415
