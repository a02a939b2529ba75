"""DoRA and IA³ adapters over HTTP: listed with their type, served in chat, refused in merges by part."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from tests.server.api.test_openai_api import assert_openai_error
from tests.server.conftest import tiny_settings

CHAT = {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 8, "temperature": 0}


@pytest.fixture
def typed_client(tiny_base_dir, peft_type_store_dir, tmp_path):
    app = create_app(tiny_settings(tiny_base_dir, peft_type_store_dir, tmp_path, max_loaded_adapters=4))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def test_types_are_listed_served_and_refused_in_merges(typed_client):
    client = typed_client
    texts = {}
    for name in ("attn-r4", "rslora-patterns", "dora", "ia3"):
        response = client.post("/v1/chat/completions", json={**CHAT, "adapter": name})
        assert response.status_code == 200, response.text
        texts[name] = response.json()["choices"][0]["message"]["content"]
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["data"]}
    assert {n: listed[n]["peft_type"] for n in texts} == {
        "attn-r4": "lora",
        "rslora-patterns": "rslora",
        "dora": "dora",
        "ia3": "ia3",
    }
    assert listed["dora"]["status"] == "loaded"
    merge = {"merge": [{"name": "attn-r4", "weight": 0.5}, {"name": "ia3", "weight": 0.5}], "method": "cat"}
    response = client.post("/v1/chat/completions", json={**CHAT, "adapter": merge})
    assert_openai_error(response, 400, param="adapter.merge[1].name")
    assert "ia3 adapter" in response.json()["error"]["message"]
