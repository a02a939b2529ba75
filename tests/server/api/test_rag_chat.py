"""Retrieval-augmented chat: passages go into the prompt and come back as `sources` (real embedder)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from tests.server.conftest import tiny_settings

DOCS = [
    {"id": "leave", "text": "Employees get 25 days of paid leave per year at Acme.", "source": "handbook.md"},
    {"id": "lunch", "text": "The canteen serves lunch from noon until two o'clock.", "source": "canteen.md"},
    {"id": "bikes", "text": "Bicycles must be parked in the courtyard racks.", "source": "campus.md"},
]
QUESTION = {"role": "user", "content": "How many days of paid leave do employees get?"}


@pytest.fixture
def rag_client(tiny_base_dir, adapter_store_dir, tmp_path):
    settings = tiny_settings(tiny_base_dir, adapter_store_dir, tmp_path, max_model_len=512)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        _ingest(client)
        yield client


def _ingest(client) -> None:
    assert client.post("/v1/rag/collections", json={"name": "handbook"}).status_code == 200
    ingest = client.post("/v1/rag/collections/handbook/documents", json={"documents": DOCS})
    assert ingest.status_code == 200, ingest.text


def test_rag_chat_returns_sources_and_puts_passages_in_the_prompt(rag_client):
    plain = rag_client.post("/v1/chat/completions", json={"messages": [QUESTION], "max_tokens": 4}).json()
    body = {"messages": [QUESTION], "max_tokens": 4, "rag": {"collection": "handbook", "top_k": 2}}
    response = rag_client.post("/v1/chat/completions", json={**body, "adapter": "attn-r4"})
    assert response.status_code == 200, response.text
    result = response.json()
    sources = result["sources"]
    assert [s["index"] for s in sources] == [1, 2]
    assert sources[0]["document_id"] == "leave" and "25 days" in sources[0]["text"]
    # the passages (tokenized byte by byte by the tiny tokenizer) are in the prompt
    added = result["usage"]["prompt_tokens"] - plain["usage"]["prompt_tokens"]
    assert added >= sum(len(s["text"]) for s in sources)


def test_rag_sources_arrive_in_the_final_stream_chunk(rag_client):
    body = {
        "messages": [QUESTION],
        "max_tokens": 4,
        "stream": True,
        "rag": {"collection": "handbook", "top_k": 1},
    }
    lines = [
        line[6:]
        for line in rag_client.post("/v1/chat/completions", json=body).text.splitlines()
        if line.startswith("data: ")
    ]
    assert lines[-1] == "[DONE]"
    final = json.loads(lines[-2])
    assert final["choices"] == [] and final["sources"][0]["document_id"] == "leave"


def test_rag_unknown_collection_is_404(rag_client):
    body = {"messages": [QUESTION], "rag": {"collection": "nope"}}
    response = rag_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 404 and response.json()["error"]["code"] == "collection_not_found"


def test_rag_passages_leave_room_for_a_prompt_tuning_adapters_virtual_tokens(
    tiny_base_dir, peft_type_store_dir, tmp_path
):
    """The passages get what the window leaves after the prompt, ``max_tokens`` *and* the adapter's
    virtual tokens: a passage that just fits on the base is dropped for a prompt-tuning adapter, and
    the request is served instead of overflowing into a 400."""
    window = 512
    settings = tiny_settings(tiny_base_dir, peft_type_store_dir, tmp_path, max_model_len=window)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        _ingest(client)
        rag = {"collection": "handbook", "top_k": 1}
        one = client.post("/v1/chat/completions", json={"messages": [QUESTION], "max_tokens": 1, "rag": rag})
        with_passage = one.json()["usage"]["prompt_tokens"]
        max_tokens = window - with_passage  # the passage just fits on the base
        while True:  # calibrate to how the packer counts the passage's tokens
            body = {"messages": [QUESTION], "max_tokens": max_tokens, "rag": rag, "temperature": 0}
            base = client.post("/v1/chat/completions", json=body)
            assert base.status_code == 200, base.text
            if base.json()["sources"]:
                break
            max_tokens -= 1
            assert max_tokens > window - with_passage - 8, "the packer's count is far from the prompt's"
        tuned = client.post("/v1/chat/completions", json={**body, "adapter": "prompt-tuning"})
        assert tuned.status_code == 200, tuned.text
        assert tuned.json()["sources"] == []  # 4 virtual tokens took the passage's room


@pytest.mark.parametrize("adapter, virtual", [("prompt-tuning", 4), ("prefix-tuning", 3)])
def test_the_api_counts_virtual_tokens_before_leasing_the_adapter(
    tiny_base_dir, peft_type_store_dir, tmp_path, adapter, virtual
):
    settings = tiny_settings(tiny_base_dir, peft_type_store_dir, tmp_path, max_model_len=256)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        body = {"prompt": list(range(3, 3 + 250)), "max_tokens": 6, "temperature": 0}
        assert client.post("/v1/completions", json=body).status_code == 200  # fills the window exactly
        refused = client.post("/v1/completions", json={**body, "adapter": adapter})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["code"] == "context_length_exceeded"
        expected = f"({250 + virtual} in the prompt, of which {virtual} are the adapter's virtual tokens"
        assert expected in error["message"]
        status = {a["name"]: a["status"] for a in client.get("/v1/adapters").json()["data"]}
        assert status[adapter] == "on_disk"  # refused before the adapter was loaded
        assert client.post(f"/v1/adapters/{adapter}/load").status_code == 200
        resident = client.post("/v1/completions", json={**body, "adapter": adapter})
        assert resident.status_code == 400 and resident.json()["error"] == error  # counted from memory too
