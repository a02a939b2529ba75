"""One collection on disk: SQLite metadata, a FAISS index and an in-memory BM25 index, kept in agreement.

Directory layout: ``collection.sqlite`` (settings, documents, chunks) and ``index.faiss``. A write commits
SQLite first, then writes the index to a temporary file, fsyncs it and renames it over the old one. A crash
in between leaves an index that disagrees with SQLite; :meth:`Collection.open` reconciles it (vectors of
deleted chunks removed, missing chunks re-embedded from their SQLite text) and logs that it did.

Concurrency: writers (ingest, delete) are serialised by a lock but embed outside it; each write builds a
new index object and swaps it in, so searches never lock and never see a half-updated index. A search that
races a write may rank a chunk that was just deleted; such ids are dropped when the texts are fetched.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rag.chunker import chunk_text
from rag.embedder import Embedder
from rag.errors import CollectionNotFound, DocumentIdInvalid, DocumentNotFound, EmptyDocument
from rag.index import IndexSettings, VectorIndex
from rag.keyword import KeywordIndex
from rag.passage import Passage
from rag.retriever import DEFAULT_MODE, Retriever, check_search
from rag.store import DocumentRecord, MetadataStore, NewChunk

logger = logging.getLogger(__name__)

SQLITE_FILE = "collection.sqlite"
INDEX_FILE = "index.faiss"
MAX_DOCUMENT_ID_CHARS = 512


@dataclass(frozen=True)
class CollectionSettings:
    """Fixed at creation: how texts are chunked and embedded and which index holds the vectors."""

    embedding_model: str
    dimension: int
    chunk_size: int
    chunk_overlap: int
    index: IndexSettings = field(default_factory=IndexSettings)
    created_at: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CollectionSettings:
        return cls(**{**d, "index": IndexSettings(**d["index"])})


@dataclass
class DocumentInput:
    """A document to ingest. Without ``id`` the document is identified by ``source``, else by its hash."""

    text: str
    source: str | None = None
    id: str | None = None
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class IngestResult:
    """What ingesting one document did: ``status`` is "created", "replaced" or "unchanged"."""

    document_id: str
    source: str
    status: str
    chunk_count: int


@dataclass(frozen=True)
class CollectionInfo:
    """Counts, on-disk sizes and settings of a collection."""

    name: str
    settings: CollectionSettings
    document_count: int
    chunk_count: int
    vector_count: int
    sqlite_bytes: int
    index_bytes: int


@dataclass
class _Prepared:
    record: DocumentRecord
    chunks: list[NewChunk]
    status: str = "created"
    vectors: np.ndarray | None = None  # (n_chunks, d)


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _open_only(method):
    """Runs a public method of an open collection; one closed (deleted) meanwhile is not found.

    Deleting a collection closes its SQLite store while a search or ingest may be running in another
    thread; whatever that raises then ("Cannot operate on a closed database", …) means the
    collection is gone, which is :class:`CollectionNotFound` (a 404), never a 500.
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self._check_open()
        try:
            return method(self, *args, **kwargs)
        except CollectionNotFound:
            raise
        except Exception as e:
            if self._closed:
                raise CollectionNotFound(self.name) from e
            raise

    return wrapper


class Collection:
    """A named collection of documents; use :meth:`create` or :meth:`open`."""

    def __init__(
        self,
        name: str,
        directory: Path,
        settings: CollectionSettings,
        store: MetadataStore,
        embedders: Callable[[str], Embedder],
    ):
        self.name = name
        self.directory = directory
        self.settings = settings
        self._store = store
        self._embedders = embedders
        self._vectors = VectorIndex(settings.dimension, settings.index)
        self._keywords = KeywordIndex()
        self._write_lock = threading.Lock()
        self._closed = False

    def _embedder(self) -> Embedder:
        return self._embedders(self.settings.embedding_model)

    @property
    def index_path(self) -> Path:
        return self.directory / INDEX_FILE

    @classmethod
    def create(
        cls, name: str, directory: Path, settings: CollectionSettings, embedders: Callable[[str], Embedder]
    ) -> Collection:
        """Initialises an empty collection in ``directory`` (which must exist and be empty)."""
        store = MetadataStore(directory / SQLITE_FILE)
        store.write_settings(settings.to_dict())
        collection = cls(name, directory, settings, store, embedders)
        collection._vectors.save(collection.index_path)
        return collection

    @classmethod
    def open(cls, name: str, directory: Path, embedders: Callable[[str], Embedder]) -> Collection:
        """Opens a collection and reconciles its index with SQLite."""
        store = MetadataStore(directory / SQLITE_FILE)
        settings = CollectionSettings.from_dict(store.read_settings())
        collection = cls(name, directory, settings, store, embedders)
        collection._reconcile()
        return collection

    def close(self) -> None:
        with self._write_lock:
            self._closed = True
            self._store.close()

    def _check_open(self) -> None:
        if self._closed:
            raise CollectionNotFound(self.name)

    # -- consistency ------------------------------------------------------------------------------------

    def _reconcile(self) -> None:
        """Makes the FAISS index hold exactly SQLite's chunks, and loads BM25."""
        self.index_path.with_name(INDEX_FILE + ".tmp").unlink(missing_ok=True)
        sqlite_ids = self._store.chunk_ids()
        try:
            self._vectors = VectorIndex.load(self.index_path, self.settings.dimension, self.settings.index)
        except Exception as e:  # missing or unreadable: rebuilt below
            logger.warning("collection %s: cannot read its index (%s); rebuilding it", self.name, e)
            self._vectors = VectorIndex(self.settings.dimension, self.settings.index)
        index_ids = self._vectors.ids()
        stale = np.setdiff1d(index_ids, sqlite_ids)
        missing = np.setdiff1d(sqlite_ids, index_ids)
        if len(stale) or len(missing):
            logger.warning(
                "collection %s: index has %d vectors but SQLite has %d chunks; rebuilding from SQLite "
                "(removing %d, re-embedding %d)",
                self.name,
                len(index_ids),
                len(sqlite_ids),
                len(stale),
                len(missing),
            )
            self._vectors.remove(stale)
            ids, texts = self._texts(missing)
            self._vectors.add(ids, self._embedder().encode(texts))
            self._vectors.save(self.index_path)
        ids, texts = self._texts(None)
        self._keywords.add(ids, texts)

    def _texts(self, ids: np.ndarray | None) -> tuple[np.ndarray, list[str]]:
        rows = list(self._store.iter_chunk_texts(ids))
        return np.array([r[0] for r in rows], dtype=np.int64), [r[1] for r in rows]

    # -- writes -----------------------------------------------------------------------------------------

    @_open_only
    def ingest(self, documents: list[DocumentInput]) -> list[IngestResult]:
        """Adds or replaces documents; all of them or none.

        A document whose id exists with the same content hash is left as it is ("unchanged"); one whose
        content changed has its old chunks and vectors removed ("replaced").

        Raises:
            EmptyDocument: a document has no text; nothing is written.
            DocumentIdInvalid: a document id is empty, over 512 characters or has control characters.
        """
        self._check_open()
        prepared = list({p.record.id: p for p in map(self._prepare, documents)}.values())  # last id wins
        changed = [p for p in prepared if self._mark_status(p) != "unchanged"]
        texts = [c.text for p in changed for c in p.chunks]
        vectors = self._embedder().encode(texts) if texts else None  # (N, d), outside the lock
        offset = 0
        for p in changed:
            p.vectors = vectors[offset : offset + len(p.chunks)]
            offset += len(p.chunks)
        with self._write_lock:
            self._check_open()
            changed = [p for p in changed if self._mark_status(p) != "unchanged"]  # re-check under the lock
            if changed:
                self._write(changed)
        return [IngestResult(p.record.id, p.record.source, p.status, len(p.chunks)) for p in prepared]

    def _prepare(self, document: DocumentInput) -> _Prepared:
        text = document.text
        source = document.source or document.id or "text"
        if not text or not text.strip():
            raise EmptyDocument(source)
        digest = content_hash(text)
        document_id = document.id or document.source or digest[:16]
        if len(document_id) > MAX_DOCUMENT_ID_CHARS or not document_id.isprintable():
            raise DocumentIdInvalid(document_id)
        embedder = self._embedder()
        pieces = chunk_text(text, embedder.token_spans, self.settings.chunk_size, self.settings.chunk_overlap)
        if not pieces:
            raise EmptyDocument(source)
        chunks = [NewChunk(i, c.text, c.start_char, c.end_char, c.token_count) for i, c in enumerate(pieces)]
        record = DocumentRecord(document_id, source, digest, dict(document.metadata), len(text), len(chunks))
        return _Prepared(record, chunks)

    def _mark_status(self, p: _Prepared) -> str:
        existing = self._store.get_document(p.record.id)
        if existing is None:
            p.status = "created"
        else:
            p.status = "unchanged" if existing.content_hash == p.record.content_hash else "replaced"
            p.record.created_at = existing.created_at
        return p.status

    def _write(self, changed: list[_Prepared]) -> None:
        """SQLite commit, then the new index written atomically and swapped in (under the write lock)."""
        new_ids, removed = self._store.write_documents([(p.record, p.chunks) for p in changed])
        ids = np.concatenate(new_ids)
        vectors = np.concatenate([p.vectors for p in changed])  # (N, d)
        self._commit_index(removed, ids, vectors)
        self._keywords.remove(removed)
        self._keywords.add(ids, [c.text for p in changed for c in p.chunks])

    def _commit_index(self, removed: np.ndarray, ids: np.ndarray, vectors: np.ndarray | None) -> None:
        index = self._vectors.clone()
        index.remove(removed)
        if vectors is not None:
            index.add(ids, vectors)
        index.save(self.index_path)
        self._vectors = index

    @_open_only
    def delete_document(self, document_id: str) -> None:
        """Deletes a document, its chunks and their vectors.

        Raises:
            DocumentNotFound: no document with that id.
        """
        with self._write_lock:
            self._check_open()
            removed = self._store.delete_document(document_id)
            if removed is None:
                raise DocumentNotFound(self.name, document_id)
            self._commit_index(removed, np.zeros(0, dtype=np.int64), None)
            self._keywords.remove(removed)

    # -- reads ------------------------------------------------------------------------------------------

    @_open_only
    def list_documents(self, limit: int = 100, offset: int = 0) -> list[DocumentRecord]:
        self._check_open()
        return self._store.list_documents(limit, offset)

    @_open_only
    def get_document(self, document_id: str) -> DocumentRecord:
        self._check_open()
        record = self._store.get_document(document_id)
        if record is None:
            raise DocumentNotFound(self.name, document_id)
        return record

    @_open_only
    def search(
        self, query: str, top_k: int = 5, mode: str = DEFAULT_MODE, filter: dict | None = None
    ) -> list[Passage]:
        """The ``top_k`` passages best matching ``query``, best first.

        Args:
            query: the search text.
            top_k: how many passages, 1..100.
            mode: "dense", "keyword" or "hybrid".
            filter: only chunks of documents matching every ``key: value`` (``document_id``, ``source`` or a
                user metadata key; a list value matches any of its items).

        Raises:
            SearchInvalid: a bad mode, top_k or filter.
        """
        self._check_open()
        check_search(mode, top_k)
        allowed = self._store.filter_chunk_ids(filter) if filter else None
        if (allowed is not None and not len(allowed)) or not query.strip():
            return []
        retriever = Retriever(self._embedder(), self._vectors, self._keywords)
        ranked = retriever.rank(query, top_k, mode, allowed)
        records = self._store.get_chunks([r.chunk_id for r in ranked])
        return [
            Passage(
                r.chunk_id, c.document_id, c.source, c.text, r.score, c.start_char, c.end_char, c.metadata
            )
            for r in ranked
            if (c := records.get(r.chunk_id)) is not None
        ]

    @_open_only
    def info(self) -> CollectionInfo:
        self._check_open()
        documents, chunks = self._store.counts()
        sqlite_bytes = sum(
            p.stat().st_size for p in self.directory.glob(SQLITE_FILE + "*") if not p.name.endswith("-shm")
        )
        index_bytes = self.index_path.stat().st_size if self.index_path.exists() else 0
        return CollectionInfo(
            self.name, self.settings, documents, chunks, self._vectors.count, sqlite_bytes, index_bytes
        )
