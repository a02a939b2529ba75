"""Auth and tenancy, limits and backpressure, request ids and metrics (issue: production readiness)."""

from __future__ import annotations

import shutil
import threading

import pytest
import yaml
from fastapi.testclient import TestClient

from server.app import create_app
from tests.server.conftest import tiny_settings

ADMIN, ALICE, BOB = "sk-admin-0123456789", "sk-alice-0123456789", "sk-bob-0123456789"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture
def secured(tiny_base_dir, adapter_store_dir, tmp_path, tiny_adapter_sources):
    for name, src in (("alice-one", "attn-r4"), ("bob-secret", "all-r8")):
        shutil.copytree(tiny_adapter_sources[src], adapter_store_dir / name)
    keys = {
        "keys": [
            {"key": ADMIN, "role": "admin"},
            {
                "key": ALICE,
                "role": "user",
                "adapters": ["alice-*"],
                "collections": ["alice-*"],
                "write_collections": ["alice-notes"],
                "requests_per_minute": 5,
            },
            {"key": BOB, "role": "user", "adapters": ["bob-*"], "collections": ["bob-*"]},
        ]
    }
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump(keys))
    settings = tiny_settings(tiny_base_dir, adapter_store_dir, tmp_path, api_keys_file=keys_file)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_every_route_needs_a_key_except_health_and_ready(secured):
    paths = secured.app.openapi()["paths"]
    assert "/v1/chat/completions" in paths and "/metrics" in paths
    for template, operations in paths.items():
        path = template.replace("{name}", "attn-r4").replace("{collection}", "c")
        path = path.replace("{document_id}", "d")
        for method in operations:
            response = secured.request(method.upper(), path, json={})
            if template in ("/health", "/ready"):
                assert response.status_code == 200
            else:
                assert response.status_code == 401, (method, path, response.status_code)
                body = response.json()  # OpenAI's shape, or TGI's flat one on the native routes
                error = body["error"] if isinstance(body["error"], dict) else body
                assert error["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "header", ["Bearer sk-wrong-0123456789", f"Bearer {ADMIN.upper()}", ADMIN, "Basic x"]
)
def test_wrong_keys_are_refused(secured, header):
    assert secured.get("/v1/models", headers={"Authorization": header}).status_code == 401


def test_user_keys_cannot_use_admin_routes(secured):
    for method, path in [
        ("POST", "/v1/adapters/alice-one/load"),
        ("DELETE", "/v1/adapters/alice-one"),
        ("POST", "/v1/adapters/alice-one/unload"),
    ]:
        assert secured.request(method, path, headers=auth(ALICE)).status_code == 403
    assert secured.post("/v1/adapters/alice-one/load", headers=auth(ADMIN)).status_code == 200


def test_tenants_cannot_use_list_or_detect_each_others_adapters(secured):
    # bob's adapter is warm (resident) while alice probes it
    assert (
        secured.post(
            "/v1/chat/completions", json={**CHAT, "adapter": "bob-secret"}, headers=auth(BOB)
        ).status_code
        == 200
    )
    probe = secured.post("/v1/chat/completions", json={**CHAT, "adapter": "bob-secret"}, headers=auth(ALICE))
    missing = secured.post(
        "/v1/chat/completions", json={**CHAT, "adapter": "bob-nothing"}, headers=auth(ALICE)
    )
    assert probe.status_code == missing.status_code == 404
    assert probe.json()["error"]["message"].replace("bob-secret", "X") == missing.json()["error"][
        "message"
    ].replace("bob-nothing", "X")
    data = secured.get("/v1/models", headers=auth(ALICE)).json()["data"][1:]
    models = {m["id"] for m in data if m.get("type") != "embedding"}
    assert models == {"alice-one"}
    listed = {a["name"] for a in secured.get("/v1/adapters", headers=auth(ALICE)).json()["data"]}
    assert listed == {"alice-one"}
    assert (
        secured.post(
            "/v1/chat/completions", json={**CHAT, "adapter": "alice-one"}, headers=auth(ALICE)
        ).status_code
        == 200
    )


def test_rate_limit_is_429_with_retry_after(secured):
    codes = [secured.get("/v1/models", headers=auth(ALICE)).status_code for _ in range(2)]
    responses = [secured.post("/v1/chat/completions", json=CHAT, headers=auth(ALICE)) for _ in range(6)]
    assert codes == [200, 200]
    limited = [r for r in responses if r.status_code == 429]
    assert len(limited) == 1 and int(limited[0].headers["retry-after"]) >= 1


def test_request_id_is_echoed_and_generated(client):
    assert client.get("/health", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    assert len(client.get("/health", headers={"X-Request-ID": "bad id!"}).headers["x-request-id"]) == 32


def test_body_and_header_limits(client):
    huge = b'{"messages": [{"role": "user", "content": "' + b"x" * (10 << 20) + b'"}]}'
    response = client.post("/v1/chat/completions", content=huge, headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
    many = {f"x-h{i}": "1" for i in range(100)}
    assert client.get("/v1/models", headers=many).status_code == 431
    assert client.get("/health").status_code == 200


def test_overload_gets_429_at_once_and_admitted_requests_complete(tiny_base_dir, adapter_store_dir, tmp_path):
    settings = tiny_settings(tiny_base_dir, adapter_store_dir, tmp_path, max_pending=4)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        results: list[int] = []
        body = {**CHAT, "max_tokens": 40, "ignore_eos": True}

        def call():
            results.append(client.post("/v1/chat/completions", json=body).status_code)

        threads = [threading.Thread(target=call) for _ in range(4 + 50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results.count(200) >= 4
        assert results.count(429) >= 40
        assert set(results) <= {200, 429}
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200  # capacity is given back


def test_metrics_exposes_the_serving_state(client):
    client.post("/v1/chat/completions", json={**CHAT, "adapter": "attn-r4"})
    text = client.get("/metrics").text
    for name in (
        "loraplex_requests_total",
        "loraplex_generated_tokens_total",
        "loraplex_time_to_first_token_seconds",
        "loraplex_running_batch_size",
        "loraplex_resident_adapters 1.0",
        "loraplex_adapter_loads 1.0",
    ):
        assert name in text
    assert 'route="/v1/chat/completions"' in text and 'adapter="attn-r4"' in text


def test_collections_follow_the_allow_lists(secured):
    for name in ("alice-notes", "alice-ro", "bob-docs"):
        assert (
            secured.post("/v1/rag/collections", json={"name": name}, headers=auth(ADMIN)).status_code == 200
        )
    assert (
        secured.post("/v1/rag/collections", json={"name": "alice-new"}, headers=auth(ALICE)).status_code
        == 403
    )
    doc = {"documents": [{"id": "d1", "text": "Alice keeps her notes here."}]}
    ingest = "/v1/rag/collections/{}/documents"
    assert secured.post(ingest.format("alice-notes"), json=doc, headers=auth(ALICE)).status_code == 200
    assert secured.post(ingest.format("alice-ro"), json=doc, headers=auth(ALICE)).status_code == 403
    hidden = secured.post(ingest.format("bob-docs"), json=doc, headers=auth(ALICE))
    missing = secured.post(ingest.format("bob-nothing"), json=doc, headers=auth(ALICE))
    assert hidden.status_code == missing.status_code == 404
    search = {"query": "notes", "top_k": 2}
    assert (
        secured.post("/v1/rag/collections/bob-docs/search", json=search, headers=auth(ALICE)).status_code
        == 404
    )
    assert (
        secured.post("/v1/rag/collections/alice-notes/search", json=search, headers=auth(ALICE)).status_code
        == 200
    )
    listed = {c["name"] for c in secured.get("/v1/rag/collections", headers=auth(ALICE)).json()["data"]}
    assert listed == {"alice-notes", "alice-ro"}
    rag_chat = {**CHAT, "rag": {"collection": "bob-docs"}}
    assert secured.post("/v1/chat/completions", json=rag_chat, headers=auth(ALICE)).status_code == 404
