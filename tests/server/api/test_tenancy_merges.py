"""Cached merges respect tenants and follow their parts; operators' data stays with operators."""

from __future__ import annotations

import shutil

from tests.server.api.test_security import ADMIN, ALICE, BOB, auth

CHAT = {"messages": [{"role": "user", "content": "merge me"}], "max_tokens": 8, "temperature": 0}
BOB_MERGE = {
    "merge": [{"name": "bob-secret", "weight": 1.0}, {"name": "bob-other", "weight": 0.5}],
    "method": "cat",
}


def _merge_name(secured) -> str:
    secured_store = secured.app.state.serving.store.root
    if not (secured_store / "bob-other").exists():
        shutil.copytree(secured_store / "alice-one", secured_store / "bob-other")
    r = secured.post("/v1/chat/completions", json={**CHAT, "adapter": BOB_MERGE}, headers=auth(BOB))
    assert r.status_code == 200, r.text
    return r.json()["model"]


def test_another_tenants_cached_merge_is_404_by_name(secured):
    name = _merge_name(secured)
    assert name.startswith("merge-")
    r = secured.post("/v1/chat/completions", json={**CHAT, "model": name}, headers=auth(ALICE))
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
    r = secured.post("/v1/chat/completions", json={**CHAT, "adapter": name}, headers=auth(ALICE))
    assert r.status_code == 404
    assert (
        secured.post("/v1/chat/completions", json={**CHAT, "model": name}, headers=auth(BOB)).status_code
        == 200
    )
    for path in ("/v1/models", "/v1/adapters"):
        listed = [m.get("id") or m.get("name") for m in secured.get(path, headers=auth(ALICE)).json()["data"]]
        assert name not in listed, path
        listed = [m.get("id") or m.get("name") for m in secured.get(path, headers=auth(BOB)).json()["data"]]
        assert name in listed, path


def test_metrics_need_an_admin_key(secured):
    _merge_name(secured)
    r = secured.get("/metrics", headers=auth(ALICE))
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    assert "bob-secret" not in r.text
    assert secured.get("/metrics", headers=auth(ADMIN)).status_code == 200


def test_deleting_a_part_drops_the_merges_made_from_it(roomy_client):
    client = roomy_client
    spec = {"merge": [{"name": "attn-r4", "weight": 1.0}, {"name": "mlp-r2", "weight": 1.0}]}
    r = client.post("/v1/chat/completions", json={**CHAT, "adapter": spec})
    name = r.json()["model"]
    assert client.post("/v1/chat/completions", json={**CHAT, "model": name}).status_code == 200
    assert client.delete("/v1/adapters/mlp-r2").status_code == 200
    r = client.post("/v1/chat/completions", json={**CHAT, "model": name})
    assert r.status_code == 404  # the cached merge went with its part
    r = client.post("/v1/chat/completions", json={**CHAT, "adapter": spec})
    assert r.status_code == 404 and r.json()["error"]["param"] == "adapter.merge[1].name"


def test_overwriting_a_part_rebuilds_the_merge_from_the_new_weights(roomy_client, tiny_adapter_sources):
    client = roomy_client
    spec = {"merge": [{"name": "attn-r4", "weight": 1.0}, {"name": "mlp-r2", "weight": 1.0}], "method": "cat"}
    before = client.post("/v1/chat/completions", json={**CHAT, "adapter": spec}).json()
    replacement = tiny_adapter_sources["all-r8"]
    files = {
        "adapter_config": ("c.json", (replacement / "adapter_config.json").read_bytes()),
        "adapter_model": ("m.safetensors", (replacement / "adapter_model.safetensors").read_bytes()),
    }
    assert client.put("/v1/adapters/mlp-r2?overwrite=true", files=files).status_code == 201
    assert client.post("/v1/chat/completions", json={**CHAT, "model": before["model"]}).status_code == 404
    after = client.post("/v1/chat/completions", json={**CHAT, "adapter": spec}).json()
    assert after["model"] == before["model"]  # same spec, same name, but the new weights:
    assert after["choices"][0]["message"]["content"] != before["choices"][0]["message"]["content"]
    resident = client.app.state.serving.registry.get(before["model"])
    assert resident.parts == ("attn-r4", "mlp-r2")


def test_no_pins_are_left_after_many_requests_of_every_kind(roomy_client):
    client = roomy_client
    spec = {"merge": [{"name": "attn-r4", "weight": 1.0}, {"name": "mlp-r2", "weight": 1.0}]}
    for body in (
        {**CHAT, "adapter": "attn-r4", "n": 3},
        {**CHAT, "adapter": spec, "stream": True},
        {**CHAT, "adapter": "missing"},
        {**CHAT, "adapter": "all-r8", "max_tokens": 10_000},
    ):
        client.post("/v1/chat/completions", json=body)
    registry = client.app.state.serving.registry
    assert all(r.pins == 0 for r in registry.resident())
    assert client.app.state.serving.pending == 0
