"""Wire models of the ``/v1/rag/...`` endpoints (pydantic lives here, at the HTTP edge only)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rag.collection import CollectionInfo, DocumentInput, IngestResult
from rag.passage import Passage
from rag.store import DocumentRecord

SearchMode = Literal["dense", "keyword", "hybrid"]
FilterValue = str | int | float | bool | list[str | int | float | bool]


class CreateCollectionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="1-64 characters of [A-Za-z0-9._-]")
    embedding_model: str | None = Field(default=None, description="local sentence-transformers directory")
    chunk_size: int | None = Field(default=None, description="tokens per chunk (default 200)")
    chunk_overlap: int | None = Field(default=None, description="tokens shared by neighbours (default 32)")
    index: Literal["flat", "hnsw"] = "flat"
    hnsw_m: int = Field(default=32, ge=2, le=256)
    hnsw_ef_construction: int = Field(default=80, ge=2, le=4096)
    hnsw_ef_search: int = Field(default=64, ge=2, le=4096)


class IndexObject(BaseModel):
    type: str
    hnsw_m: int | None = None
    hnsw_ef_construction: int | None = None
    hnsw_ef_search: int | None = None


class CollectionObject(BaseModel):
    object: Literal["rag.collection"] = "rag.collection"
    name: str
    embedding_model: str
    dimension: int
    chunk_size: int
    chunk_overlap: int
    index: IndexObject
    document_count: int
    chunk_count: int
    vector_count: int
    size_bytes: int
    sqlite_bytes: int
    index_bytes: int
    created_at: int

    @classmethod
    def from_info(cls, info: CollectionInfo) -> CollectionObject:
        s = info.settings
        hnsw = s.index.kind == "hnsw"
        return cls(
            name=info.name,
            embedding_model=s.embedding_model,
            dimension=s.dimension,
            chunk_size=s.chunk_size,
            chunk_overlap=s.chunk_overlap,
            index=IndexObject(
                type=s.index.kind,
                hnsw_m=s.index.hnsw_m if hnsw else None,
                hnsw_ef_construction=s.index.hnsw_ef_construction if hnsw else None,
                hnsw_ef_search=s.index.hnsw_ef_search if hnsw else None,
            ),
            document_count=info.document_count,
            chunk_count=info.chunk_count,
            vector_count=info.vector_count,
            size_bytes=info.sqlite_bytes + info.index_bytes,
            sqlite_bytes=info.sqlite_bytes,
            index_bytes=info.index_bytes,
            created_at=int(s.created_at),
        )


class CollectionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CollectionObject]


class CollectionDeleted(BaseModel):
    object: Literal["rag.collection.deleted"] = "rag.collection.deleted"
    name: str
    deleted: bool = True


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str
    source: str | None = Field(default=None, description="display name; also the id when id is absent")
    id: str | None = Field(default=None, description="stable id: same id with new text replaces the document")
    metadata: dict[str, Any] = Field(default_factory=dict)

    def to_input(self) -> DocumentInput:
        return DocumentInput(self.text, self.source, self.id, dict(self.metadata))


class IngestTextRequest(BaseModel):
    """Either ``{"documents": [...]}`` or one document's fields at the top level."""

    model_config = ConfigDict(extra="forbid")

    documents: list[DocumentIn] | None = Field(default=None, min_length=1, max_length=1000)
    text: str | None = None
    source: str | None = None
    id: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_shape(self) -> IngestTextRequest:
        if (self.documents is None) == (self.text is None):
            raise ValueError("give either 'documents' (a list) or 'text'")
        return self

    def to_inputs(self) -> list[DocumentInput]:
        if self.documents is not None:
            return [d.to_input() for d in self.documents]
        return [DocumentInput(self.text or "", self.source, self.id, dict(self.metadata))]


class IngestedDocument(BaseModel):
    id: str
    source: str
    status: Literal["created", "replaced", "unchanged"]
    chunk_count: int

    @classmethod
    def from_result(cls, r: IngestResult) -> IngestedDocument:
        return cls(id=r.document_id, source=r.source, status=r.status, chunk_count=r.chunk_count)


class IngestResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[IngestedDocument]


class DocumentObject(BaseModel):
    object: Literal["rag.document"] = "rag.document"
    id: str
    source: str
    content_hash: str
    char_count: int
    chunk_count: int
    metadata: dict[str, Any]
    created_at: int
    updated_at: int

    @classmethod
    def from_record(cls, r: DocumentRecord) -> DocumentObject:
        return cls(
            id=r.id,
            source=r.source,
            content_hash=r.content_hash,
            char_count=r.char_count,
            chunk_count=r.chunk_count,
            metadata=r.metadata,
            created_at=int(r.created_at),
            updated_at=int(r.updated_at),
        )


class DocumentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DocumentObject]


class DocumentDeleted(BaseModel):
    object: Literal["rag.document.deleted"] = "rag.document.deleted"
    id: str
    deleted: bool = True


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1)
    top_k: int = Field(default=5, ge=1, le=100)
    mode: SearchMode = "hybrid"
    filter: dict[str, FilterValue] | None = Field(
        default=None, description="document_id, source or user metadata keys; a list matches any item"
    )


class SearchResult(BaseModel):
    chunk_id: int
    document_id: str
    source: str
    text: str
    score: float
    start_char: int
    end_char: int
    metadata: dict[str, Any]

    @classmethod
    def from_passage(cls, p: Passage) -> SearchResult:
        return cls(**p.to_dict())


class SearchResponse(BaseModel):
    object: Literal["list"] = "list"
    mode: SearchMode
    data: list[SearchResult]


class RagOptions(BaseModel):
    """The ``rag`` field of a chat completion request."""

    model_config = ConfigDict(extra="forbid")

    collection: str
    top_k: int = Field(default=4, ge=1, le=20)
    mode: SearchMode = "hybrid"
    filter: dict[str, FilterValue] | None = None
