"""Domain errors of the RAG package; the server maps them to HTTP in one place.

Each error carries ``code`` (OpenAI-style error code) and ``param`` (the request field at fault) as class
attributes; HTTP statuses are assigned in one table, ``server/api/errors.py``. They pickle intact (class,
message and attributes), so they keep their meaning when they cross a process boundary: under Ray Serve
the RAG deployment raises them and the engine replica that called it maps them to HTTP.
"""

from __future__ import annotations

from typing import Any


def _rebuild(cls: type[BaseException], args: tuple, attributes: dict[str, Any]) -> BaseException:
    error = cls.__new__(cls, *args)  # BaseException.__new__ sets args; __init__ (other signature) not run
    error.args = args
    error.__dict__.update(attributes)
    return error


class RagError(Exception):
    """Base of the RAG errors. Pickling calls no ``__init__`` (whose arguments differ from ``args``,
    which holds the message only): the unpickled error has the same message and attributes."""

    def __reduce__(self) -> tuple:
        return _rebuild, (type(self), self.args, dict(self.__dict__))


class CollectionNotFound(RagError, LookupError):
    """No collection of that name exists."""

    code = "collection_not_found"
    param = "collection"

    def __init__(self, name: str):
        super().__init__(f"The collection '{name}' does not exist.")
        self.name = name


class CollectionExists(RagError, ValueError):
    """A collection of that name already exists."""

    code = "collection_exists"
    param = "name"

    def __init__(self, name: str):
        super().__init__(f"A collection named '{name}' already exists.")
        self.name = name


class CollectionNameInvalid(RagError, ValueError):
    """A name outside ``[A-Za-z0-9._-]{1,64}`` (or one starting with '.')."""

    code = "invalid_collection_name"
    param = "name"

    def __init__(self, name: str):
        super().__init__(
            f"Invalid collection name {name!r}: names are 1-64 characters of [A-Za-z0-9._-] "
            "and may not start with '.'."
        )
        self.name = name


class CollectionSettingsInvalid(RagError, ValueError):
    """Chunking or index settings that cannot work; ``param`` names the setting at fault."""

    code = "invalid_collection_settings"

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class EmbeddingModelInvalid(RagError, ValueError):
    """An embedding model that is not a local sentence-transformers directory."""

    code = "invalid_embedding_model"
    param = "embedding_model"

    def __init__(self, model: str, reason: str):
        super().__init__(f"The embedding model {model!r} cannot be used: {reason}.")
        self.model = model


class DocumentNotFound(RagError, LookupError):
    """No document with that id in the collection."""

    code = "document_not_found"
    param = "document_id"

    def __init__(self, collection: str, document_id: str):
        super().__init__(f"The collection '{collection}' has no document '{document_id}'.")
        self.collection = collection
        self.document_id = document_id


class EmptyDocument(RagError, ValueError):
    """A document with no text to index (empty, whitespace, or a PDF without a text layer)."""

    code = "empty_document"
    param = "documents"

    def __init__(self, source: str):
        super().__init__(f"The document {source!r} contains no text.")
        self.source = source


class DocumentTooLarge(RagError, ValueError):
    """An upload or document over the configured size limit."""

    code = "document_too_large"
    param = "documents"

    def __init__(self, source: str, size_bytes: int, limit_bytes: int):
        super().__init__(f"{source!r} is {size_bytes} bytes; the limit is {limit_bytes} bytes.")
        self.source = source
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes


class UnsupportedFileType(RagError, ValueError):
    """A file that is not plain text, Markdown, HTML or PDF."""

    code = "unsupported_file_type"
    param = "files"

    def __init__(self, filename: str, content_type: str | None):
        super().__init__(
            f"Unsupported file type for {filename!r} (content type {content_type or 'unknown'}); "
            "supported: .txt, .md, .markdown, .html, .htm, .pdf."
        )
        self.filename = filename
        self.content_type = content_type


class DocumentUnreadable(RagError, ValueError):
    """A file that claims a supported type but cannot be parsed (a broken or encrypted PDF)."""

    code = "document_unreadable"
    param = "files"

    def __init__(self, filename: str, reason: str):
        super().__init__(f"Cannot read {filename!r}: {reason}.")
        self.filename = filename


class SearchInvalid(RagError, ValueError):
    """A search request that cannot run (unknown mode, bad top_k, bad filter)."""

    code = "invalid_search"

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class DocumentIdInvalid(RagError, ValueError):
    """A document id that is empty, too long or contains control characters."""

    code = "invalid_document_id"
    param = "id"

    def __init__(self, document_id: str):
        super().__init__(f"Invalid document id {document_id[:80]!r}: ids are 1-512 printable characters.")
        self.document_id = document_id


class CollectionsInUse(RuntimeError):
    """Another process (a running server, its RAG deployment, or a ``loraplex rag`` command) has the
    collections directory open: each FAISS index and SQLite store has one writer. Not an HTTP error: it
    is raised when a server or command starts."""

    def __init__(self, root: str, holder: str):
        who = f"process {holder}" if holder else "another process"
        super().__init__(
            f"the RAG collections under {root} are open in {who}; each collection has one writer, so "
            "use that server's /v1/rag routes, or stop it first"
        )
        self.root, self.holder = root, holder
