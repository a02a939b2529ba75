"""The /v1/rag endpoints through a FastAPI app with the project's error handlers: on the app's own
collections (``loraplex serve``) and through the RAG deployment's client (``loraplex ray serve``),
whose calls, results and errors cross a pickle round trip as they cross Ray."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.api.collections.api_router import router
from server.api.errors import install_error_handlers


def remote_collections(manager):
    """``manager`` as an engine replica reaches it under Ray Serve (without a Ray instance)."""
    pytest.importorskip("ray")
    from server.config import Settings
    from server.ray.rag_client import RemoteCollections
    from tests.server.ray.in_process_handle import InProcessRagHandle

    settings = Settings(rag_max_upload_bytes=manager.max_upload_bytes)
    return RemoteCollections(InProcessRagHandle(manager), settings)


@pytest.fixture(params=["local", "ray-handle"])
def client(manager, request):
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.rag = manager if request.param == "local" else remote_collections(manager)
    with TestClient(app) as client:
        yield client


@pytest.fixture
def docs(client) -> str:
    r = client.post("/v1/rag/collections", json={"name": "docs", "chunk_size": 32, "chunk_overlap": 4})
    assert r.status_code == 200, r.text
    return "docs"


def assert_error(response, status: int, code: str | None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    assert "Traceback" not in error["message"] and "/tmp" not in error["message"]
    return error


def test_collection_lifecycle(client):
    r = client.post("/v1/rag/collections", json={"name": "notes", "index": "hnsw", "hnsw_m": 16})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "rag.collection" and body["name"] == "notes"
    assert body["index"] == {"type": "hnsw", "hnsw_m": 16, "hnsw_ef_construction": 80, "hnsw_ef_search": 64}
    assert (body["chunk_size"], body["chunk_overlap"], body["document_count"]) == (200, 32, 0)
    assert [c["name"] for c in client.get("/v1/rag/collections").json()["data"]] == ["notes"]
    assert client.get("/v1/rag/collections/notes").json()["chunk_count"] == 0
    assert client.delete("/v1/rag/collections/notes").json() == {
        "object": "rag.collection.deleted",
        "name": "notes",
        "deleted": True,
    }
    assert_error(client.get("/v1/rag/collections/notes"), 404, "collection_not_found")


def test_ingest_json_search_and_delete(client, docs):
    r = client.post(
        f"/v1/rag/collections/{docs}/documents",
        json={
            "documents": [
                {
                    "text": "Zebras have black and white stripes.",
                    "id": "zebra",
                    "metadata": {"kind": "animal"},
                },
                {"text": "Trains run on rails between stations.", "source": "trains.md"},
            ]
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["data"] == [
        {"id": "zebra", "source": "zebra", "status": "created", "chunk_count": 1},
        {"id": "trains.md", "source": "trains.md", "status": "created", "chunk_count": 1},
    ]
    r = client.post(
        f"/v1/rag/collections/{docs}/documents",
        json={"text": "Trains run on rails between stations.", "source": "trains.md"},
    )
    assert r.json()["data"][0]["status"] == "unchanged"

    r = client.post(f"/v1/rag/collections/{docs}/search", json={"query": "zebra stripes", "top_k": 1})
    assert r.status_code == 200
    [hit] = r.json()["data"]
    assert hit["document_id"] == "zebra" and hit["text"].startswith("Zebras")
    assert (hit["start_char"], hit["end_char"]) == (0, 36) and hit["metadata"] == {"kind": "animal"}
    r = client.post(
        f"/v1/rag/collections/{docs}/search", json={"query": "rails", "filter": {"kind": "animal"}}
    )
    assert r.json()["data"][0]["document_id"] == "zebra"

    listed = client.get(f"/v1/rag/collections/{docs}/documents").json()["data"]
    assert [d["id"] for d in listed] == ["zebra", "trains.md"] and listed[0]["chunk_count"] == 1
    assert client.delete(f"/v1/rag/collections/{docs}/documents/zebra").json()["deleted"] is True
    r = client.post(f"/v1/rag/collections/{docs}/search", json={"query": "zebra stripes", "mode": "keyword"})
    assert r.json()["data"] == []
    assert_error(client.delete(f"/v1/rag/collections/{docs}/documents/zebra"), 404, "document_not_found")


def test_upload_files(client, docs, pdf_bytes):
    files = [
        ("files", ("guide.md", b"# Guide\n\nOtters hold hands while sleeping.", "text/markdown")),
        ("files", ("page.html", b"<h1>Page</h1><p>Herons stand still.</p>", "text/html")),
        ("files", ("paper.pdf", pdf_bytes("Pelicans fly in lines"), "application/pdf")),
    ]
    r = client.post(f"/v1/rag/collections/{docs}/documents", files=files, data={"metadata": '{"team": "a"}'})
    assert r.status_code == 200, r.text
    assert [d["id"] for d in r.json()["data"]] == ["guide.md", "page.html", "paper.pdf"]
    r = client.post(f"/v1/rag/collections/{docs}/search", json={"query": "pelicans", "mode": "keyword"})
    assert r.json()["data"][0]["source"] == "paper.pdf"
    assert r.json()["data"][0]["metadata"] == {"team": "a"}


def test_document_with_slash_in_id_can_be_deleted(client, docs):
    client.post(f"/v1/rag/collections/{docs}/documents", json={"text": "nested", "id": "dir/sub/a.md"})
    assert client.delete(f"/v1/rag/collections/{docs}/documents/dir/sub/a.md").status_code == 200


@pytest.mark.parametrize(
    "method, path, kwargs, status, code, param",
    [
        ("get", "/v1/rag/collections/nope", {}, 404, "collection_not_found", "collection"),
        (
            "post",
            "/v1/rag/collections/nope/search",
            {"json": {"query": "q"}},
            404,
            "collection_not_found",
            None,
        ),
        (
            "post",
            "/v1/rag/collections/nope/documents",
            {"json": {"text": "x"}},
            404,
            "collection_not_found",
            None,
        ),
        ("delete", "/v1/rag/collections/nope", {}, 404, "collection_not_found", None),
        (
            "post",
            "/v1/rag/collections",
            {"json": {"name": "bad name!"}},
            400,
            "invalid_collection_name",
            "name",
        ),
        ("post", "/v1/rag/collections", {"json": {"name": "x" * 65}}, 400, "invalid_collection_name", "name"),
        ("post", "/v1/rag/collections", {"json": {"name": "docs"}}, 409, "collection_exists", "name"),
        (
            "post",
            "/v1/rag/collections",
            {"json": {"name": "c", "chunk_size": 4}},
            400,
            "invalid_collection_settings",
            "chunk_size",
        ),
        (
            "post",
            "/v1/rag/collections/docs/documents",
            {"json": {"text": "   "}},
            400,
            "empty_document",
            None,
        ),
        (
            "post",
            "/v1/rag/collections/docs/documents",
            {"json": {"documents": []}},
            400,
            "invalid_request",
            None,
        ),
        (
            "post",
            "/v1/rag/collections/docs/documents",
            {"content": b"{not json"},
            400,
            "invalid_request",
            None,
        ),
        (
            "post",
            "/v1/rag/collections/docs/documents",
            {"json": {"text": "x" * 70_000}},
            413,
            "document_too_large",
            None,
        ),
        (
            "post",
            "/v1/rag/collections/docs/documents",
            {"files": [("files", ("a.docx", b"PK..", "application/octet-stream"))]},
            415,
            "unsupported_file_type",
            "files",
        ),
        (
            "post",
            "/v1/rag/collections/docs/documents",
            {"files": [("files", ("big.txt", b"x" * 70_000, "text/plain"))]},
            413,
            "document_too_large",
            None,
        ),
        (
            "post",
            "/v1/rag/collections/docs/search",
            {"json": {"query": "q", "mode": "fuzzy"}},
            400,
            "invalid_request",
            "mode",
        ),
        (
            "post",
            "/v1/rag/collections/docs/search",
            {"json": {"query": "q", "top_k": 0}},
            400,
            "invalid_request",
            "top_k",
        ),
    ],
)
def test_error_shapes(client, docs, method, path, kwargs, status, code, param):
    assert_error(getattr(client, method)(path, **kwargs), status, code, param)


def test_unparseable_pdf_ingests_nothing(client, docs, pdf_bytes):
    files = [
        ("files", ("good.pdf", pdf_bytes("Good text"), "application/pdf")),
        ("files", ("broken.pdf", b"%PDF-1.4 broken", "application/pdf")),
    ]
    error = assert_error(
        client.post(f"/v1/rag/collections/{docs}/documents", files=files), 400, "document_unreadable"
    )
    assert "broken.pdf" in error["message"]
    assert client.get(f"/v1/rag/collections/{docs}").json()["document_count"] == 0
