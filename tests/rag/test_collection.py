"""Ingest, replace, delete and search through the CollectionManager (hashing embedder)."""

from __future__ import annotations

import numpy as np
import pytest

from rag.collection import DocumentInput
from rag.collections import WRITER_LOCK, CollectionManager
from rag.errors import (
    CollectionExists,
    CollectionNameInvalid,
    CollectionNotFound,
    CollectionSettingsInvalid,
    DocumentIdInvalid,
    DocumentNotFound,
    DocumentTooLarge,
    EmptyDocument,
    SearchInvalid,
)

FRUIT = "# Fruit\n\nBananas are yellow and curved. Apples are red or green and crunchy."
CARS = "# Cars\n\nCars have four wheels and an engine. Bicycles have two wheels and pedals."
ZEBRA = "Zebras are striped animals of the African savanna."


def sources(passages) -> list[str]:
    return [p.document_id for p in passages]


def assert_consistent(manager: CollectionManager, name: str) -> None:
    collection = manager.get(name)
    info = collection.info()
    assert info.vector_count == info.chunk_count
    assert set(collection._vectors.ids().tolist()) == set(collection._store.chunk_ids().tolist())
    assert collection._keywords.count == info.chunk_count


@pytest.fixture(params=["flat", "hnsw"])
def docs(manager: CollectionManager, request) -> str:
    manager.create("docs", chunk_size=16, chunk_overlap=2, index=request.param)
    manager.ingest(
        "docs",
        [
            DocumentInput(FRUIT, source="fruit.md", metadata={"lang": "en", "year": 2020}),
            DocumentInput(CARS, source="cars.md", metadata={"lang": "de"}),
            DocumentInput(ZEBRA, id="zebra"),
        ],
    )
    return "docs"


@pytest.mark.parametrize("mode", ["dense", "keyword", "hybrid"])
def test_search_finds_the_matching_document(manager, docs, mode):
    passages = manager.retrieve(docs, "striped zebras savanna", top_k=3, mode=mode)
    assert passages[0].document_id == "zebra"
    assert passages[0].text == ZEBRA and (passages[0].start_char, passages[0].end_char) == (0, len(ZEBRA))
    assert [p.score for p in passages] == sorted((p.score for p in passages), reverse=True)


def test_reingest_same_content_changes_nothing(manager, docs, embedder):
    before = manager.info(docs)
    index_mtime = manager.get(docs).index_path.stat().st_mtime_ns
    encoded = embedder.encoded_texts
    results = manager.ingest(
        docs, [DocumentInput(FRUIT, source="fruit.md"), DocumentInput(ZEBRA, id="zebra")]
    )
    assert [r.status for r in results] == ["unchanged", "unchanged"]
    assert embedder.encoded_texts == encoded  # nothing re-embedded
    assert manager.info(docs) == before
    assert manager.get(docs).index_path.stat().st_mtime_ns == index_mtime


def test_replace_removes_old_vectors(manager, docs):
    old_ids = {
        p.chunk_id
        for p in manager.retrieve(docs, "bananas apples", 10, "keyword")
        if p.document_id == "fruit.md"
    }
    [result] = manager.ingest(docs, [DocumentInput("Cherries are small and dark red.", source="fruit.md")])
    assert result.status == "replaced"
    for mode in ("dense", "keyword", "hybrid"):
        passages = manager.retrieve(docs, "bananas apples yellow", 10, mode)
        assert not any("Bananas" in p.text for p in passages)
    assert not old_ids & set(manager.get(docs)._vectors.ids().tolist())
    assert manager.retrieve(docs, "cherries", 1, "keyword")[0].document_id == "fruit.md"
    assert manager.get(docs).get_document("fruit.md").chunk_count == 1
    assert_consistent(manager, docs)


def test_delete_document_removes_vectors_and_rows(manager, docs):
    manager.delete_document(docs, "zebra")
    for mode in ("dense", "keyword", "hybrid"):
        assert "zebra" not in sources(manager.retrieve(docs, "zebras striped", 10, mode))
    assert [d.id for d in manager.list_documents(docs)] == ["fruit.md", "cars.md"]
    assert_consistent(manager, docs)
    with pytest.raises(DocumentNotFound):
        manager.delete_document(docs, "zebra")


def test_state_survives_reopen(manager, docs, embedder, tmp_path):
    manager.delete_document(docs, "cars.md")
    before = manager.info(docs)
    manager.close()
    reopened = CollectionManager(tmp_path / "rag", load_embedder=lambda model: embedder)
    try:
        after = reopened.info(docs)
        assert (after.settings, after.document_count, after.chunk_count, after.vector_count) == (
            before.settings,
            before.document_count,
            before.chunk_count,
            before.vector_count,
        )
        assert reopened.retrieve(docs, "zebras", 1, "hybrid")[0].document_id == "zebra"
        assert_consistent(reopened, docs)
    finally:
        reopened.close()


def test_delete_collection_removes_its_files(manager, docs, tmp_path):
    manager.delete(docs)
    assert [p.name for p in (tmp_path / "rag").iterdir()] == [WRITER_LOCK]  # the owner's lock only
    with pytest.raises(CollectionNotFound):
        manager.retrieve(docs, "zebras")
    manager.create(docs)  # the name is free again
    assert manager.info(docs).chunk_count == 0


@pytest.mark.parametrize(
    "filter, expected",
    [
        ({"lang": "en"}, {"fruit.md"}),
        ({"lang": ["en", "de"]}, {"fruit.md", "cars.md"}),
        ({"year": 2020}, {"fruit.md"}),
        ({"document_id": "zebra"}, {"zebra"}),
        ({"source": "cars.md"}, {"cars.md"}),
        ({"lang": "fr"}, set()),
    ],
)
def test_filter(manager, docs, filter, expected):
    passages = manager.retrieve(docs, "wheels bananas zebras", 10, "hybrid", filter=filter)
    assert set(sources(passages)) == expected


def test_batch_is_all_or_nothing(manager, docs):
    before = manager.info(docs)
    with pytest.raises(EmptyDocument):
        manager.ingest(
            docs, [DocumentInput("New text about owls.", id="owls"), DocumentInput("  \n", id="blank")]
        )
    assert manager.info(docs) == before


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda m: m.create("bad/name"), CollectionNameInvalid),
        (lambda m: m.create(".hidden"), CollectionNameInvalid),
        (lambda m: m.create("x" * 65), CollectionNameInvalid),
        (lambda m: m.create("docs"), CollectionExists),
        (lambda m: m.create("c", chunk_size=1000), CollectionSettingsInvalid),
        (lambda m: m.create("c", chunk_size=32, chunk_overlap=16), CollectionSettingsInvalid),
        (lambda m: m.create("c", index="ivf"), CollectionSettingsInvalid),
        (lambda m: m.ingest("nope", [DocumentInput("x")]), CollectionNotFound),
        (lambda m: m.ingest("docs", [DocumentInput("")]), EmptyDocument),
        (lambda m: m.ingest("docs", [DocumentInput("x" * 70_000)]), DocumentTooLarge),
        (lambda m: m.ingest("docs", [DocumentInput("x", id="a\x00b")]), DocumentIdInvalid),
        (lambda m: m.retrieve("docs", "q", mode="fuzzy"), SearchInvalid),
        (lambda m: m.retrieve("docs", "q", top_k=0), SearchInvalid),
        (lambda m: m.retrieve("docs", "q", filter={"bad key": 1}), SearchInvalid),
        (lambda m: m.retrieve("docs", "q", filter={"k": {"nested": 1}}), SearchInvalid),
    ],
)
def test_errors(manager, call, error):
    manager.create("docs")
    with pytest.raises(error):
        call(manager)


def test_document_ids_default_to_source_then_hash(manager):
    manager.create("c")
    results = manager.ingest("c", [DocumentInput("alpha", source="a.txt"), DocumentInput("beta")])
    assert results[0].document_id == "a.txt"
    assert len(results[1].document_id) == 16 and results[1].source == "text"
    assert np.all([r.status == "created" for r in results])
