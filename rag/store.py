"""SQLite metadata of one collection: its settings, documents and chunk texts.

SQLite is the source of truth: the FAISS index and the BM25 index can both be rebuilt from the chunk rows.
Chunk ids come from ``AUTOINCREMENT`` and are never reused, so two sets of ids that are equal describe the
same chunks. One connection per collection, serialised by a lock (SQLite itself runs in WAL mode).
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rag.errors import SearchInvalid

_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    char_count INTEGER NOT NULL,
    chunk_count INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    document_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    text TEXT NOT NULL,
    start_char INTEGER NOT NULL,
    end_char INTEGER NOT NULL,
    token_count INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks(document_id, position);
"""
_FILTER_KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_COLUMN_FILTERS = {"document_id": "c.document_id", "source": "d.source"}


@dataclass
class DocumentRecord:
    """A document row: identity, provenance and counts (not its text)."""

    id: str
    source: str
    content_hash: str
    metadata: dict = field(default_factory=dict)
    char_count: int = 0
    chunk_count: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass
class ChunkRecord:
    """A chunk row joined with its document's source and metadata."""

    id: int
    document_id: str
    source: str
    text: str
    start_char: int
    end_char: int
    metadata: dict = field(default_factory=dict)


@dataclass
class NewChunk:
    """A chunk about to be written (its id is assigned by SQLite)."""

    position: int
    text: str
    start_char: int
    end_char: int
    token_count: int


class MetadataStore:
    """The SQLite database of one collection."""

    def __init__(self, path: Path):
        self.path = path
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- settings ---------------------------------------------------------------------------------------

    def write_settings(self, settings: dict) -> None:
        with self._lock, self._conn:
            self._conn.execute("BEGIN")
            self._conn.executemany(
                "INSERT OR REPLACE INTO settings(key, value) VALUES (?, ?)",
                [(k, json.dumps(v)) for k, v in settings.items()],
            )

    def read_settings(self) -> dict:
        with self._lock:
            rows = self._conn.execute("SELECT key, value FROM settings").fetchall()
        return {k: json.loads(v) for k, v in rows}

    # -- documents --------------------------------------------------------------------------------------

    def get_document(self, document_id: str) -> DocumentRecord | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT id, source, content_hash, metadata, char_count, chunk_count, created_at, updated_at "
                "FROM documents WHERE id = ?",
                (document_id,),
            ).fetchone()
        return _document(row) if row else None

    def list_documents(self, limit: int = 100, offset: int = 0) -> list[DocumentRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, source, content_hash, metadata, char_count, chunk_count, created_at, updated_at "
                "FROM documents ORDER BY created_at, rowid LIMIT ? OFFSET ?",
                (limit, offset),
            ).fetchall()
        return [_document(r) for r in rows]

    def write_documents(
        self, documents: list[tuple[DocumentRecord, list[NewChunk]]]
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Inserts or replaces documents and their chunks in one transaction.

        Returns:
            The new chunk ids of each document (in chunk order), and the ids of the chunks replaced.
        """
        now = time.time()
        new_ids: list[np.ndarray] = []
        removed: list[int] = []
        with self._lock, self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            for doc, chunks in documents:
                removed += self._delete_document_rows(doc.id)
                self._conn.execute(
                    "INSERT INTO documents(id, source, content_hash, metadata, char_count, chunk_count, "
                    "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        doc.id,
                        doc.source,
                        doc.content_hash,
                        json.dumps(doc.metadata),
                        doc.char_count,
                        len(chunks),
                        doc.created_at or now,
                        now,
                    ),
                )
                ids = [
                    self._conn.execute(
                        "INSERT INTO chunks(document_id, position, text, start_char, end_char, token_count) "
                        "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                        (doc.id, c.position, c.text, c.start_char, c.end_char, c.token_count),
                    ).fetchone()[0]
                    for c in chunks
                ]
                new_ids.append(np.array(ids, dtype=np.int64))
        return new_ids, np.array(removed, dtype=np.int64)

    def delete_document(self, document_id: str) -> np.ndarray | None:
        """Deletes a document and its chunks; returns the removed chunk ids, or None if there was none."""
        with self._lock, self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            if not self._conn.execute("SELECT 1 FROM documents WHERE id = ?", (document_id,)).fetchone():
                return None
            return np.array(self._delete_document_rows(document_id), dtype=np.int64)

    def _delete_document_rows(self, document_id: str) -> list[int]:
        ids = [
            r[0] for r in self._conn.execute("SELECT id FROM chunks WHERE document_id = ?", (document_id,))
        ]
        self._conn.execute("DELETE FROM chunks WHERE document_id = ?", (document_id,))
        self._conn.execute("DELETE FROM documents WHERE id = ?", (document_id,))
        return ids

    # -- chunks -----------------------------------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        """(documents, chunks)."""
        with self._lock:
            docs = self._conn.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
            chunks = self._conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        return docs, chunks

    def chunk_ids(self) -> np.ndarray:
        with self._lock:
            rows = self._conn.execute("SELECT id FROM chunks ORDER BY id").fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def iter_chunk_texts(self, ids: np.ndarray | None = None, batch: int = 1024) -> Iterator[tuple[int, str]]:
        """(id, text) of the given chunks, or of all chunks, in id order."""
        with self._lock:
            if ids is None:
                rows = self._conn.execute("SELECT id, text FROM chunks ORDER BY id").fetchall()
            else:
                rows = []
                for i in range(0, len(ids), batch):
                    part = [int(x) for x in ids[i : i + batch]]
                    marks = ",".join("?" * len(part))
                    rows += self._conn.execute(
                        f"SELECT id, text FROM chunks WHERE id IN ({marks}) ORDER BY id", part
                    ).fetchall()
        yield from rows

    def get_chunks(self, ids: list[int]) -> dict[int, ChunkRecord]:
        """The chunks with these ids, joined with their documents."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = self._conn.execute(
                "SELECT c.id, c.document_id, d.source, c.text, c.start_char, c.end_char, d.metadata "
                f"FROM chunks c JOIN documents d ON d.id = c.document_id WHERE c.id IN ({marks})",
                [int(i) for i in ids],
            ).fetchall()
        return {r[0]: ChunkRecord(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6])) for r in rows}

    def filter_chunk_ids(self, filter: dict) -> np.ndarray:
        """Ids of the chunks whose document matches every ``key: value`` of ``filter``.

        ``document_id`` and ``source`` match those fields; any other key matches the document's user
        metadata. A list value matches any of its items.
        """
        clauses, args = [], []
        for key, value in filter.items():
            if not _FILTER_KEY_RE.fullmatch(str(key)):
                raise SearchInvalid(
                    "filter", f"filter keys are 1-64 characters of [A-Za-z0-9_.-], not {key!r}"
                )
            values = value if isinstance(value, list) else [value]
            if not values or not all(isinstance(v, (str, int, float, bool)) for v in values):
                raise SearchInvalid(
                    "filter", f"filter.{key} must be a string, number, boolean or a list of them"
                )
            column = _COLUMN_FILTERS.get(key)
            if column is None:
                column = "json_extract(d.metadata, ?)"
                args.append(f'$."{key}"')
            clauses.append(f"{column} IN ({','.join('?' * len(values))})")
            args += values
        where = " AND ".join(clauses) or "1"
        with self._lock:
            rows = self._conn.execute(
                f"SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document_id WHERE {where}", args
            ).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)


def _document(row: tuple) -> DocumentRecord:
    return DocumentRecord(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5], row[6], row[7])
