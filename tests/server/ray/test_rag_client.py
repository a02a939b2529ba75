"""The RAG deployment's client without a Ray instance: what an unreachable deployment answers, and
that the RAG library's errors keep their class, message and attributes across Ray.

(Every ``/v1/rag`` route through the client, errors included, is in ``tests/rag/test_api.py``.)
"""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from rag.collection import DocumentInput
from rag.collections import CollectionManager
from rag.errors import CollectionSettingsInvalid, DocumentTooLarge
from server.api.collections.api_router import router
from server.api.errors import install_error_handlers
from server.config import Settings
from tests.rag.fakes import HashingEmbedder

ray = pytest.importorskip("ray")

from ray.exceptions import ActorDiedError  # noqa: E402
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError  # noqa: E402

from server.ray.rag_client import RemoteCollections  # noqa: E402
from tests.server.ray.in_process_handle import InProcessRagHandle  # noqa: E402

MAX_UPLOAD_BYTES = 4096


@pytest.fixture
def manager(tmp_path):
    manager = CollectionManager(
        tmp_path / "rag", load_embedder=lambda model: HashingEmbedder(), max_upload_bytes=MAX_UPLOAD_BYTES
    )
    yield manager
    manager.close()


def remote(handle: InProcessRagHandle) -> RemoteCollections:
    return RemoteCollections(handle, Settings(rag_max_upload_bytes=MAX_UPLOAD_BYTES))


def test_rag_errors_arrive_with_their_class_message_and_attributes(manager):
    collections = remote(InProcessRagHandle(manager))
    with pytest.raises(CollectionSettingsInvalid) as settings_error:
        collections.create("c", chunk_size=4)
    assert settings_error.value.param == "chunk_size" and "chunk_size must be" in str(settings_error.value)
    collections.create("c")
    # Over the bound here means the route was bypassed: the deployment checks it again.
    with pytest.raises(DocumentTooLarge) as too_large:
        collections.ingest("c", [DocumentInput("x" * (MAX_UPLOAD_BYTES + 1), source="big.txt")])
    error = too_large.value
    assert (error.source, error.size_bytes, error.limit_bytes) == ("big.txt", MAX_UPLOAD_BYTES + 1, 4096)
    assert type(error) is DocumentTooLarge  # Ray's wrapper is gone: the route's handler sees the error


@pytest.mark.parametrize(
    "failure",
    [
        ActorDiedError(),
        DeploymentUnavailableError("RagCollections"),
        BackPressureError(num_queued_requests=1, max_queued_requests=1),
    ],
    ids=["died", "unavailable", "backpressure"],
)
def test_unreachable_rag_deployment_answers_503_in_openais_shape(failure):
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.rag = remote(InProcessRagHandle(None, failure=failure))
    with TestClient(app) as client:
        response = client.get("/v1/rag/collections")
    assert response.status_code == 503
    assert response.json() == {
        "error": {
            "message": "The RAG service is unavailable; retry.",
            "type": "server_error",
            "param": None,
            "code": "rag_unavailable",
        }
    }


def test_only_collection_calls_go_to_the_deployment(manager):
    collections = remote(InProcessRagHandle(manager))
    collections.close()  # the deployment's collections stay open
    assert collections.list_collections() == []
    with pytest.raises(AttributeError):
        collections.get  # noqa: B018 (a Collection object cannot cross processes)
