"""Crash consistency: SQLite committed, index not yet renamed; the next start reconciles."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rag.collection import INDEX_FILE, DocumentInput
from rag.collections import WRITER_LOCK, CollectionManager

# Runs in a subprocess: ingests, then dies (SIGKILL) inside the index rename of the next write.
CRASHING_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests_dir!r})
    from pathlib import Path
    from fakes import HashingEmbedder
    import rag.index
    from rag.collection import DocumentInput
    from rag.collections import CollectionManager

    embedder = HashingEmbedder()
    manager = CollectionManager(Path({root!r}), load_embedder=lambda model: embedder)
    manager.create("docs", chunk_size=16, chunk_overlap=2, index={index!r})
    manager.ingest("docs", [DocumentInput("Apples are red. " * 10, id="apples"),
                            DocumentInput("Pears are green. " * 10, id="pears")])
    rag.index._replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
    {crashing_call}
    """
)


def run_crashing_writer(root: Path, index: str, crashing_call: str) -> subprocess.CompletedProcess:
    script = CRASHING_WRITER.format(
        tests_dir=str(Path(__file__).parent), root=str(root), index=index, crashing_call=crashing_call
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("index", ["flat", "hnsw"])
@pytest.mark.parametrize(
    "crashing_call, present, absent",
    [
        ('manager.ingest("docs", [DocumentInput("Zebras are striped. " * 10, id="zebras")])', "zebras", None),
        ('manager.delete_document("docs", "pears")', "apples", "pears"),
        ('manager.ingest("docs", [DocumentInput("Apples are sour now.", id="apples")])', "apples", None),
    ],
)
def test_restart_after_kill_between_commit_and_rename(
    tmp_path, embedder, caplog, index, crashing_call, present, absent
):
    root = tmp_path / "rag"
    proc = run_crashing_writer(root, index, crashing_call)
    assert proc.returncode == -9, proc.stderr
    assert (root / "docs" / (INDEX_FILE + ".tmp")).exists()  # the new index was written, never renamed

    with caplog.at_level(logging.WARNING, logger="rag.collection"):
        manager = CollectionManager(root, load_embedder=lambda model: embedder)
    try:
        assert "rebuilding from SQLite" in caplog.text
        collection = manager.get("docs")
        info = collection.info()
        assert info.vector_count == info.chunk_count
        assert set(collection._vectors.ids().tolist()) == set(collection._store.chunk_ids().tolist())
        assert not (root / "docs" / (INDEX_FILE + ".tmp")).exists()
        found = {p.document_id for p in manager.retrieve("docs", "apples pears zebras", 20, "dense")}
        assert present in found and absent not in found
    finally:
        manager.close()
    # A second restart finds nothing to repair.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rag.collection"):
        CollectionManager(root, load_embedder=lambda model: embedder).close()
    assert "rebuilding" not in caplog.text


def test_unreadable_index_is_rebuilt(manager, tmp_path, embedder):
    manager.create("docs", chunk_size=16, chunk_overlap=2)
    manager.ingest("docs", [DocumentInput("Owls hunt at night. " * 8, id="owls")])
    chunks = manager.info("docs").chunk_count
    manager.close()
    (tmp_path / "rag" / "docs" / INDEX_FILE).write_bytes(b"garbage")
    reopened = CollectionManager(tmp_path / "rag", load_embedder=lambda model: embedder)
    try:
        assert reopened.info("docs").vector_count == chunks
        assert reopened.retrieve("docs", "owls", 1, "dense")[0].document_id == "owls"
    finally:
        reopened.close()


def test_leftover_temporary_folders_are_removed(tmp_path, embedder):
    root = tmp_path / "rag"
    (root / ".tmp-docs-123").mkdir(parents=True)
    (root / ".trash-old-456").mkdir()
    CollectionManager(root, load_embedder=lambda model: embedder).close()
    assert [p.name for p in root.iterdir()] == [WRITER_LOCK]  # the leftovers are gone, the lock stays
