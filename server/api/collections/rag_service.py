"""What the RAG routes and retrieval-augmented chat call: the serving state's ``rag``.

Under ``loraplex serve`` it is the app's own :class:`rag.collections.CollectionManager`; under
``loraplex ray serve`` it is :class:`server.ray.rag_client.RemoteCollections`, which sends each call
to the one RAG deployment that owns the collections (a FAISS index has one writer). Both raise the
``rag.errors`` exceptions, so a route answers the same either way.
"""

from __future__ import annotations

from typing import Any, Protocol

from rag.collection import CollectionInfo, DocumentInput, IngestResult
from rag.embedder import Embedder
from rag.extract import UploadedFile
from rag.passage import Passage
from rag.store import DocumentRecord


class RagUnavailable(RuntimeError):
    """The service that owns the collections cannot be reached (the RAG deployment died or is starting)."""

    code = "rag_unavailable"
    param = None

    def __init__(self) -> None:
        super().__init__("The RAG service is unavailable; retry.")


class RagService(Protocol):
    """The collection calls the server makes (see :class:`rag.collections.CollectionManager`)."""

    max_upload_bytes: int  # the largest document text or file, in bytes
    default_embedding_model: str

    def embedder(self, model: str) -> Embedder:
        """An embedder in this process (``/v1/embeddings``); collections embed where they live."""
        ...

    def check_exists(self, name: str) -> None: ...

    def create(self, name: str, **settings: Any) -> CollectionInfo: ...

    def list_collections(self) -> list[CollectionInfo]: ...

    def info(self, name: str) -> CollectionInfo: ...

    def delete(self, name: str) -> None: ...

    def ingest(self, name: str, documents: list[DocumentInput]) -> list[IngestResult]: ...

    def ingest_files(
        self, name: str, files: list[UploadedFile], metadata: dict | None = None
    ) -> list[IngestResult]: ...

    def list_documents(self, name: str, limit: int = 100, offset: int = 0) -> list[DocumentRecord]: ...

    def delete_document(self, name: str, document_id: str) -> None: ...

    def retrieve(
        self, name: str, query: str, top_k: int = 5, mode: str = "hybrid", filter: dict | None = None
    ) -> list[Passage]: ...

    def close(self) -> None: ...


# Answered in the calling process; every other method of RagService goes to whoever owns the collections.
LOCAL_CALLS = frozenset({"embedder", "close"})
COLLECTION_CALLS = (
    frozenset(
        name for name, value in vars(RagService).items() if callable(value) and not name.startswith("_")
    )
    - LOCAL_CALLS
)
