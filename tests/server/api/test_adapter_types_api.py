"""DoRA, IA³ and prefix-tuning adapters over HTTP: listed with their type, served in chat, refused in merges
by part; a broken prefix is one 400 with every reason."""

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


def test_prefix_tuning_is_listed_served_budgeted_and_a_broken_one_is_a_400_with_every_reason(
    typed_client, peft_type_store_dir
):
    import json

    import torch
    from safetensors.torch import save_file

    client = typed_client
    response = client.post("/v1/chat/completions", json={**CHAT, "adapter": "prefix-tuning"})
    assert response.status_code == 200, response.text
    base = client.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]["content"]
    assert response.json()["choices"][0]["message"]["content"] != base
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["data"]}
    assert listed["prefix-tuning"]["peft_type"] == "prefix_tuning"
    assert listed["prefix-projection"]["peft_type"] == "prefix_tuning"

    counted = client.post("/tokenize", json={"prompt": "x"}).json()
    long = {"prompt": "x", "max_tokens": counted["max_model_len"] - counted["count"]}  # fits the window
    assert client.post("/v1/completions", json=long).status_code == 200  # on the base
    response = client.post("/v1/completions", json={**long, "adapter": "prefix-tuning"})
    assert_openai_error(response, 400)
    assert "3 are the adapter's virtual tokens" in response.json()["error"]["message"]

    broken = peft_type_store_dir / "broken-prefix"
    broken.mkdir()
    config = json.loads((peft_type_store_dir / "prefix-tuning" / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(
        json.dumps({**config, "num_layers": 3, "num_attention_heads": 4})
    )
    save_file(
        {"prompt_embeddings": torch.full((3, 6 * 32), float("nan"))}, broken / "adapter_model.safetensors"
    )
    response = client.post("/v1/chat/completions", json={**CHAT, "adapter": "broken-prefix"})
    assert_openai_error(response, 400)
    error = response.json()["error"]
    assert error["code"] == "adapter_invalid"
    for reason in ("is for 3 layers", "4 key/value heads", "heads are 8 wide", "NaN or infinity"):
        assert reason in error["message"], error["message"]
