"""Concurrent ingest, replace, delete and search from several threads."""

from __future__ import annotations

import threading

from rag.collection import DocumentInput


def test_concurrent_ingest_and_search(manager):
    manager.create("docs", chunk_size=16, chunk_overlap=2)
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(w: int) -> None:
        try:
            for i in range(15):
                manager.ingest(
                    "docs",
                    [DocumentInput(f"writer {w} document {i} about topic{i % 5}. " * 4, id=f"{w}-{i}")],
                )
                if i % 3 == 0:
                    manager.ingest(
                        "docs", [DocumentInput(f"replaced text {w} {i} topic{i % 5}", id=f"{w}-{i}")]
                    )
                if i % 4 == 0:
                    manager.delete_document("docs", f"{w}-{i}")
        except BaseException as e:
            errors.append(e)

    def reader() -> None:
        try:
            while not stop.is_set():
                for mode in ("dense", "keyword", "hybrid"):
                    for p in manager.retrieve("docs", "document about topic3", 5, mode):
                        assert p.text
                manager.list_documents("docs")
                manager.info("docs")
        except BaseException as e:
            errors.append(e)

    writers = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join(timeout=60)
    stop.set()
    for t in readers:
        t.join(timeout=60)
    assert not errors, errors
    info = manager.info("docs")
    assert info.document_count == 3 * (15 - 4)
    assert info.vector_count == info.chunk_count
