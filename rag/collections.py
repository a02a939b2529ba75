"""All collections under one directory: creation, lookup, deletion and the calls the server makes.

``DATA_DIR/rag/NAME/`` holds one collection. Creation builds the collection in a hidden temporary folder
and renames it into place; deletion renames it to a hidden folder before removing it, so a crash never
leaves a half-made or half-deleted collection visible. Hidden leftovers are removed on start, and every
collection is reconciled (index against SQLite) when the manager opens it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from rag.chunker import DEFAULT_CHUNK_OVERLAP, DEFAULT_CHUNK_SIZE
from rag.collection import (
    SQLITE_FILE,
    Collection,
    CollectionInfo,
    CollectionSettings,
    DocumentInput,
    IngestResult,
)
from rag.embedder import Embedder, EmbedderCache, canonical_model_name, load_embedder
from rag.errors import (
    CollectionExists,
    CollectionNameInvalid,
    CollectionNotFound,
    CollectionSettingsInvalid,
    CollectionsInUse,
    DocumentTooLarge,
)
from rag.extract import UploadedFile, extract_text
from rag.index import INDEX_KINDS, IndexSettings
from rag.passage import Passage
from rag.retriever import DEFAULT_MODE
from rag.store import DocumentRecord

logger = logging.getLogger(__name__)

COLLECTION_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MIN_CHUNK_SIZE = 16
WRITER_LOCK = ".writer.lock"  # flock'ed by the one manager (process) that owns the directory


def check_collection_name(name: str) -> str:
    """Returns ``name`` if it is a valid collection name, else raises :class:`CollectionNameInvalid`."""
    if not isinstance(name, str) or not COLLECTION_NAME_RE.fullmatch(name) or name.startswith("."):
        raise CollectionNameInvalid(str(name)[:80])
    return name


def _take_writer_lock(root: Path) -> int:
    """An exclusive lock on ``root`` for this manager's lifetime (released by :meth:`close`, or by the
    kernel when the process dies, so a crash never leaves it held). Another manager in any process,
    e.g. ``loraplex rag ingest`` beside a running server, gets :class:`CollectionsInUse` instead of
    writing the same index and deleting the other's half-made collections as leftovers."""
    fd = os.open(root / WRITER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise CollectionsInUse(str(root), holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class CollectionManager:
    """Owns every collection under ``root``; thread-safe.

    Args:
        root: the directory holding one folder per collection (created if missing).
        default_embedding_model: the model of collections created without one: the default alias
            "all-MiniLM-L6-v2" or a local sentence-transformers directory.
        max_upload_bytes: the largest file (or JSON document text) accepted, in bytes.
        load_embedder: builds an embedder from a model name; embedders are cached and shared.
    """

    def __init__(
        self,
        root: Path,
        *,
        default_embedding_model: str | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        load_embedder: Callable[[str], Embedder] = load_embedder,
    ):
        self.root = Path(root)
        self.default_embedding_model = canonical_model_name(default_embedding_model)
        self.max_upload_bytes = max_upload_bytes
        self._embedders = EmbedderCache(load_embedder)
        self._lock = threading.Lock()
        self._collections: dict[str, Collection] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        self._writer_lock: int | None = _take_writer_lock(self.root)
        try:
            self._open_all()
        except BaseException:
            self._release_writer_lock()
            raise

    def _release_writer_lock(self) -> None:
        fd, self._writer_lock = self._writer_lock, None
        if fd is not None:
            os.close(fd)  # releases the flock

    def _open_all(self) -> None:
        for path in sorted(self.root.iterdir()):
            if path.name == WRITER_LOCK:
                continue
            if path.name.startswith("."):
                logger.info("removing leftover %s", path)
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_dir() and (path / SQLITE_FILE).is_file():
                try:
                    self._collections[path.name] = Collection.open(path.name, path, self.embedder)
                except Exception:
                    logger.exception("cannot open collection %s; skipping it", path.name)

    def embedder(self, model: str) -> Embedder:
        """The shared embedder of ``model``, loaded on first use."""
        return self._embedders.get(model)

    def close(self) -> None:
        with self._lock:
            collections, self._collections = list(self._collections.values()), {}
        for collection in collections:
            collection.close()
        self._release_writer_lock()

    # -- collections ------------------------------------------------------------------------------------

    def get(self, name: str) -> Collection:
        """The open collection ``name``.

        Raises:
            CollectionNotFound: no such collection.
        """
        with self._lock:
            collection = self._collections.get(name)
        if collection is None:
            raise CollectionNotFound(name)
        return collection

    def create(
        self,
        name: str,
        *,
        embedding_model: str | None = None,
        chunk_size: int | None = None,
        chunk_overlap: int | None = None,
        index: str = "flat",
        hnsw_m: int = 32,
        hnsw_ef_construction: int = 80,
        hnsw_ef_search: int = 64,
    ) -> CollectionInfo:
        """Creates an empty collection.

        Args:
            name: 1-64 characters of ``[A-Za-z0-9._-]``, not starting with '.'.
            embedding_model: the default alias or a local sentence-transformers directory.
            chunk_size: tokens per chunk (default 200), at most what the embedding model reads.
            chunk_overlap: tokens shared by consecutive chunks (default 32), under half the chunk size.
            index: "flat" (exact) or "hnsw" (approximate, for large collections).
            hnsw_m: HNSW graph degree.
            hnsw_ef_construction: HNSW build-time beam width.
            hnsw_ef_search: HNSW search-time beam width.

        Raises:
            CollectionNameInvalid, CollectionExists, CollectionSettingsInvalid, EmbeddingModelInvalid.
        """
        check_collection_name(name)
        model = canonical_model_name(embedding_model) if embedding_model else self.default_embedding_model
        embedder = self.embedder(model)
        settings = CollectionSettings(
            embedding_model=model,
            dimension=embedder.dimension,
            chunk_size=DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size,
            chunk_overlap=DEFAULT_CHUNK_OVERLAP if chunk_overlap is None else chunk_overlap,
            index=IndexSettings(index, hnsw_m, hnsw_ef_construction, hnsw_ef_search),
        )
        _check_settings(settings, embedder)
        with self._lock:
            if name in self._collections or (self.root / name).exists():
                raise CollectionExists(name)
            tmp = self.root / f".tmp-{name}-{uuid.uuid4().hex}"
            tmp.mkdir()
            try:
                Collection.create(name, tmp, replace(settings, created_at=time.time()), self.embedder).close()
                tmp.rename(self.root / name)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            path = self.root / name
            collection = Collection.open(name, path, self.embedder)
            self._collections[name] = collection
        logger.info("created collection %s (%s, index %s)", name, model, index)
        return collection.info()

    def list_collections(self) -> list[CollectionInfo]:
        with self._lock:
            collections = sorted(self._collections.values(), key=lambda c: c.name)
        infos = []
        for collection in collections:
            try:
                infos.append(collection.info())
            except CollectionNotFound:  # deleted meanwhile
                continue
        return infos

    def info(self, name: str) -> CollectionInfo:
        return self.get(name).info()

    def check_exists(self, name: str) -> None:
        """Raises :class:`CollectionNotFound` unless the collection ``name`` exists."""
        self.get(name)

    def delete(self, name: str) -> None:
        """Deletes a collection with all its documents, vectors and files.

        Raises:
            CollectionNotFound: no such collection.
        """
        with self._lock:
            collection = self._collections.pop(name, None)
            if collection is None:
                raise CollectionNotFound(name)
            collection.close()  # waits for a write in flight
            trash = self.root / f".trash-{name}-{uuid.uuid4().hex}"
            collection.directory.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
        logger.info("deleted collection %s", name)

    # -- documents --------------------------------------------------------------------------------------

    def ingest(self, name: str, documents: list[DocumentInput]) -> list[IngestResult]:
        """Adds or replaces text documents in a collection, all or none (see :meth:`Collection.ingest`).

        Raises:
            CollectionNotFound, DocumentTooLarge, EmptyDocument, DocumentIdInvalid.
        """
        collection = self.get(name)
        for document in documents:
            size = len(document.text.encode("utf-8"))
            if size > self.max_upload_bytes:
                raise DocumentTooLarge(document.source or document.id or "text", size, self.max_upload_bytes)
        return collection.ingest(documents)

    def ingest_files(
        self, name: str, files: list[UploadedFile], metadata: dict | None = None
    ) -> list[IngestResult]:
        """Extracts the text of uploaded files and ingests them, all or none; each file's name is its id.

        Raises:
            CollectionNotFound, DocumentTooLarge, UnsupportedFileType, DocumentUnreadable, EmptyDocument.
        """
        self.get(name)
        for file in files:
            if len(file.data) > self.max_upload_bytes:
                raise DocumentTooLarge(file.filename, len(file.data), self.max_upload_bytes)
        documents = [
            DocumentInput(
                extract_text(f.data, f.filename, f.content_type),
                source=f.filename,
                metadata=dict(metadata or {}),
            )
            for f in files
        ]
        return self.ingest(name, documents)

    def list_documents(self, name: str, limit: int = 100, offset: int = 0) -> list[DocumentRecord]:
        return self.get(name).list_documents(limit, offset)

    def delete_document(self, name: str, document_id: str) -> None:
        self.get(name).delete_document(document_id)

    def retrieve(
        self, name: str, query: str, top_k: int = 5, mode: str = DEFAULT_MODE, filter: dict | None = None
    ) -> list[Passage]:
        """The ``top_k`` passages of collection ``name`` best matching ``query``.

        See :meth:`rag.collection.Collection.search` for the arguments.

        Raises:
            CollectionNotFound, SearchInvalid.
        """
        return self.get(name).search(query, top_k, mode, filter)


def _check_settings(settings: CollectionSettings, embedder: Embedder) -> None:
    size, overlap = settings.chunk_size, settings.chunk_overlap
    if not isinstance(size, int) or not MIN_CHUNK_SIZE <= size <= embedder.max_tokens:
        raise CollectionSettingsInvalid(
            "chunk_size",
            f"chunk_size must be from {MIN_CHUNK_SIZE} to {embedder.max_tokens} "
            f"(what the embedding model reads), not {size!r}",
        )
    if not isinstance(overlap, int) or not 0 <= overlap < size // 2:
        raise CollectionSettingsInvalid(
            "chunk_overlap", f"chunk_overlap must be at least 0 and less than chunk_size / 2, not {overlap!r}"
        )
    if settings.index.kind not in INDEX_KINDS:
        raise CollectionSettingsInvalid("index", f"index must be one of {', '.join(INDEX_KINDS)}")
    hnsw = settings.index
    if min(hnsw.hnsw_m, hnsw.hnsw_ef_construction, hnsw.hnsw_ef_search) < 2:
        raise CollectionSettingsInvalid("index", "HNSW parameters must be at least 2")
