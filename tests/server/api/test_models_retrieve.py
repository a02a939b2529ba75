"""GET /v1/models/{id}: base, adapters, cached merges and the embedder, scoped to the caller's tenancy."""

from __future__ import annotations

import shutil

import pytest
import yaml
from fastapi.testclient import TestClient

from server.app import create_app
from tests.server.conftest import tiny_settings

ADMIN, ALICE = "sk-admin-0123456789", "sk-alice-0123456789"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
ALIAS = "text-embedding-3-small"


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def secured_settings(tiny_base_dir, adapter_store_dir, tmp_path, tiny_adapter_sources, **overrides):
    """Settings with an admin key and Alice, a user who may use ``alice-*`` (alice-one, alice-two)."""
    for name, src in (("alice-one", "attn-r4"), ("alice-two", "mlp-r2"), ("bob-secret", "all-r8")):
        shutil.copytree(tiny_adapter_sources[src], adapter_store_dir / name)
    keys = {
        "keys": [
            {"key": ADMIN, "role": "admin"},
            {"key": ALICE, "role": "user", "adapters": ["alice-*"]},
        ]
    }
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump(keys))
    return tiny_settings(
        tiny_base_dir,
        adapter_store_dir,
        tmp_path,
        api_keys_file=keys_file,
        max_loaded_adapters=4,
        embedding_aliases={ALIAS: "all-MiniLM-L6-v2"},
        **overrides,
    )


@pytest.fixture
def secured(tiny_base_dir, adapter_store_dir, tmp_path, tiny_adapter_sources):
    settings = secured_settings(tiny_base_dir, adapter_store_dir, tmp_path, tiny_adapter_sources)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def assert_model_not_found(response, name: str) -> None:
    assert response.status_code == 404, response.text
    assert response.json() == {
        "error": {
            "message": f"The model '{name}' does not exist.",
            "type": "not_found_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def merge_of(client, *parts: str) -> str:
    """Runs one chat on a per-request merge of ``parts`` (as admin) and returns the cached merge's name."""
    spec = {"merge": [{"name": p, "weight": 0.5} for p in parts], "method": "cat"}
    response = client.post("/v1/chat/completions", json={**CHAT, "adapter": spec}, headers=auth(ADMIN))
    assert response.status_code == 200, response.text
    return response.json()["model"]


def test_every_listed_model_can_be_retrieved_with_the_same_entry(secured):
    for key in (ADMIN, ALICE):
        listed = secured.get("/v1/models", headers=auth(key)).json()["data"]
        for entry in listed:
            response = secured.get(f"/v1/models/{entry['id']}", headers=auth(key))
            assert response.status_code == 200, response.text
            assert response.json() == entry


def test_base_adapter_and_embedder_entries(secured):
    base_id = secured.get("/v1/models", headers=auth(ADMIN)).json()["data"][0]["id"]
    base = secured.get(f"/v1/models/{base_id}", headers=auth(ALICE)).json()
    assert (base["object"], base["owned_by"], base["parent"]) == ("model", "loraplex", None)
    adapter = secured.get("/v1/models/alice-one", headers=auth(ALICE)).json()
    assert (adapter["id"], adapter["parent"]) == ("alice-one", base_id)
    for name in ("all-MiniLM-L6-v2", ALIAS):
        embedder = secured.get(f"/v1/models/{name}", headers=auth(ALICE)).json()
        assert embedder["id"] == name and embedder["type"] == "embedding"
        assert embedder["root"] == "all-MiniLM-L6-v2" and embedder["owned_by"] == "loraplex"


def test_unknown_and_other_tenants_models_are_the_same_404(secured):
    assert_model_not_found(secured.get("/v1/models/nope", headers=auth(ADMIN)), "nope")
    assert_model_not_found(secured.get("/v1/models/bob-secret", headers=auth(ALICE)), "bob-secret")
    assert_model_not_found(secured.get("/v1/models/bob-missing", headers=auth(ALICE)), "bob-missing")
    assert secured.get("/v1/models/bob-secret", headers=auth(ADMIN)).status_code == 200
    assert secured.get("/v1/models/alice-one").status_code == 401


def test_a_merge_is_visible_only_if_every_part_is(secured):
    hidden_part = merge_of(secured, "alice-one", "bob-secret")
    all_visible = merge_of(secured, "alice-one", "alice-two")
    assert hidden_part.startswith("merge-") and all_visible.startswith("merge-")
    assert secured.get(f"/v1/models/{hidden_part}", headers=auth(ADMIN)).status_code == 200
    assert_model_not_found(secured.get(f"/v1/models/{hidden_part}", headers=auth(ALICE)), hidden_part)
    merged = secured.get(f"/v1/models/{all_visible}", headers=auth(ALICE))
    assert merged.status_code == 200, merged.text
    assert merged.json()["id"] == all_visible


def test_a_merge_that_is_not_resident_is_not_found(secured):
    assert_model_not_found(secured.get("/v1/models/merge-0123abcd", headers=auth(ADMIN)), "merge-0123abcd")
