"""Plain text from uploaded files: text, Markdown, HTML (headings kept as Markdown) and PDF."""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import PurePath

from rag.errors import DocumentUnreadable, UnsupportedFileType

logger = logging.getLogger(__name__)

_KIND_BY_SUFFIX = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".markdown": "text",
    ".rst": "text",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
}
_KIND_BY_CONTENT_TYPE = {
    "text/plain": "text",
    "text/markdown": "text",
    "text/x-markdown": "text",
    "text/html": "html",
    "application/xhtml+xml": "html",
    "application/pdf": "pdf",
}
SUPPORTED_SUFFIXES = tuple(_KIND_BY_SUFFIX)
_BLOCK_TAGS = ("p", "div", "section", "article", "li", "tr", "pre", "blockquote", "table", "ul", "ol", "br")


@dataclass(frozen=True)
class UploadedFile:
    """A file as received: its name, bytes and the content type the client declared."""

    filename: str
    data: bytes
    content_type: str | None = None


def file_kind(filename: str, content_type: str | None = None) -> str:
    """Returns "text", "html" or "pdf" from the file name, else from the content type.

    Raises:
        UnsupportedFileType: neither says it is a supported type.
    """
    kind = _KIND_BY_SUFFIX.get(PurePath(filename).suffix.lower())
    if kind is None and content_type:
        kind = _KIND_BY_CONTENT_TYPE.get(content_type.split(";")[0].strip().lower())
    if kind is None:
        raise UnsupportedFileType(filename, content_type)
    return kind


def extract_text(data: bytes, filename: str, content_type: str | None = None) -> str:
    """Returns the text of a file's bytes.

    Raises:
        UnsupportedFileType: not text, Markdown, HTML or PDF.
        DocumentUnreadable: a PDF that cannot be parsed.
    """
    kind = file_kind(filename, content_type)
    if kind == "pdf":
        return pdf_text(data, filename)
    text = decode_text(data)
    return html_text(text) if kind == "html" else text


def decode_text(data: bytes) -> str:
    """UTF-8 (with or without BOM), falling back to Latin-1 so that any bytes decode."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def html_text(html: str) -> str:
    """The visible text of an HTML page, with headings as Markdown headings and blocks as paragraphs."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "head"]):
        tag.decompose()
    for level in range(1, 7):
        for tag in soup.find_all(f"h{level}"):
            tag.insert_before("\n\n" + "#" * level + " ")
            tag.insert_after("\n\n")
    for tag in soup.find_all(_BLOCK_TAGS):
        tag.insert_after("\n\n" if tag.name != "br" else "\n")
    return normalize_whitespace(soup.get_text())


def pdf_text(data: bytes, filename: str) -> str:
    """The text layer of a PDF, pages separated by blank lines."""
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise DocumentUnreadable(filename, "the PDF is encrypted")
        pages = [page.extract_text() or "" for page in reader.pages]
    except DocumentUnreadable:
        raise
    except Exception as e:  # pypdf raises many types for malformed files
        raise DocumentUnreadable(filename, "not a valid PDF") from e
    return normalize_whitespace("\n\n".join(pages))


def normalize_whitespace(text: str) -> str:
    """Collapses runs of spaces within lines and of blank lines, keeping paragraph breaks."""
    text = re.sub(r"[ \t\r\f\v\xa0]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()
