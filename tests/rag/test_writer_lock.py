"""One writer per collections directory: a second manager (another server, or ``loraplex rag`` beside
a running one) is refused instead of writing the same FAISS index and deleting the first one's
half-made collections as leftovers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rag.collection import DocumentInput
from rag.collections import CollectionManager
from rag.errors import CollectionsInUse

HOLDER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests_dir!r})
    from pathlib import Path
    from fakes import HashingEmbedder
    from rag.collections import CollectionManager
    manager = CollectionManager(Path({root!r}), load_embedder=lambda model: HashingEmbedder())
    print("open", flush=True)
    time.sleep(120)
    """
)


def test_a_second_manager_is_refused_until_the_first_closes(manager, embedder, tmp_path):
    with pytest.raises(CollectionsInUse, match=f"process {os.getpid()}"):
        CollectionManager(tmp_path / "rag", load_embedder=lambda model: embedder)
    manager.create("docs", chunk_size=16, chunk_overlap=2)
    manager.ingest("docs", [DocumentInput("Owls hunt at night. " * 4, id="owls")])
    manager.close()
    reopened = CollectionManager(tmp_path / "rag", load_embedder=lambda model: embedder)
    try:
        assert reopened.info("docs").document_count == 1  # the lock file is not a collection or leftover
        assert [c.name for c in reopened.list_collections()] == ["docs"]
    finally:
        reopened.close()


def test_the_rag_cli_beside_a_running_owner_exits_without_touching_it(tmp_path, capsys):
    import rag.cli

    root = tmp_path / "data" / "rag"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(tests_dir=str(Path(__file__).parent), root=str(root))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        in_progress = root / ".creating-docs"  # what the owner's create looks like mid-way
        in_progress.mkdir()
        corpus = tmp_path / "corpus.md"
        corpus.write_text("Otters hold hands while they sleep.")
        code = rag.cli.main(["ingest", "animals", str(corpus), "--data-dir", str(tmp_path / "data")])
        assert code == 2
        assert f"open in process {holder.pid}" in capsys.readouterr().err
        assert in_progress.is_dir() and not (root / "animals").exists()
    finally:
        holder.kill()
        holder.wait(30)
    # The owner died (no close): the kernel released its lock.
    CollectionManager(root, load_embedder=lambda model: None).close()
