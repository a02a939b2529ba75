"""A collection deleted while others search or ingest into it is a 404 for them, never a 500."""

from __future__ import annotations

import threading

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from rag.collection import DocumentInput
from rag.errors import CollectionNotFound
from server.api.collections.api_router import router
from server.api.errors import install_error_handlers


@pytest.fixture
def client(manager):
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.rag = manager
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def _hammer(manager, name: str, kind: str, start: threading.Barrier, errors: list[BaseException]) -> None:
    start.wait()
    for i in range(200):
        try:
            if kind == "search":
                manager.retrieve(name, "topic1", 5, "hybrid")
            elif kind == "ingest":
                manager.ingest(name, [DocumentInput(f"new text {i}", id=f"n{i}")])
            else:
                manager.info(name)
        except CollectionNotFound:
            return  # what a client gets: 404
        except BaseException as e:  # anything else would be a 500
            errors.append(e)
            return


def test_search_and_ingest_racing_a_delete_get_404s(manager):
    for round_ in range(6):
        name = f"race{round_}"
        manager.create(name, chunk_size=16, chunk_overlap=2)
        manager.ingest(
            name, [DocumentInput(f"doc {i} about topic{i % 3}. " * 6, id=str(i)) for i in range(20)]
        )
        errors: list[BaseException] = []
        start = threading.Barrier(4)
        threads = [
            threading.Thread(target=_hammer, args=(manager, name, kind, start, errors))
            for kind in ("search", "ingest", "info")
        ]
        for t in threads:
            t.start()
        start.wait()
        manager.delete(name)
        for t in threads:
            t.join(30)
        assert not errors, errors


def test_a_search_in_flight_when_its_collection_is_deleted_is_a_404(manager, embedder, monkeypatch):
    """Deterministic: the search is held inside its query embedding while the delete runs."""
    manager.create("held", chunk_size=16, chunk_overlap=2)
    manager.ingest("held", [DocumentInput("some text about topic one. " * 4, id="a")])
    inside, resume = threading.Event(), threading.Event()
    original = embedder.encode

    def slow_encode(texts):
        if texts == ["topic one"]:
            inside.set()
            resume.wait(10)
        return original(texts)

    monkeypatch.setattr(embedder, "encode", slow_encode)
    outcome: list[object] = []

    def search() -> None:
        try:
            outcome.append(manager.retrieve("held", "topic one", 5, "hybrid"))
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=search)
    thread.start()
    assert inside.wait(10)
    manager.delete("held")
    resume.set()
    thread.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], CollectionNotFound), outcome


def test_deeply_nested_upload_metadata_is_a_400(client):
    assert client.post("/v1/rag/collections", json={"name": "docs"}).status_code == 200
    deep = '{"a": ' * 5_000 + "1" + "}" * 5_000
    r = client.post(
        "/v1/rag/collections/docs/documents",
        files={"files": ("a.md", b"# Title\n\nSome text.")},
        data={"metadata": deep},
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "metadata"
    ok = client.post(
        "/v1/rag/collections/docs/documents",
        files={"files": ("a.md", b"# Title\n\nSome text.")},
        data={"metadata": '{"team": {"name": "hr"}}'},
    )
    assert ok.status_code == 200, ok.text
