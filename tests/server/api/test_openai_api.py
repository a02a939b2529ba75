"""The OpenAI-compatible API on a real engine over the tiny model."""

from __future__ import annotations

import json
import shutil

import pytest

CHAT = {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 8, "temperature": 0}


def assert_openai_error(response, status: int, code: str | None = None, param: str | None = None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in body["error"]["message"] and "/tmp" not in body["error"]["message"]
    if code:
        assert body["error"]["code"] == code
    if param:
        assert body["error"]["param"] == param
    return body["error"]


def test_models_lists_base_and_adapters_with_parent(client):
    data = client.get("/v1/models").json()["data"]
    base_id = data[0]["id"]
    assert data[0]["parent"] is None
    adapters = {m["id"]: m for m in data[1:] if m.get("type") != "embedding"}
    assert set(adapters) == {"attn-r4", "all-r8", "mlp-r2"}
    assert all(m["parent"] == base_id for m in adapters.values())


def test_chat_completion_shape_and_usage(client):
    body = client.post("/v1/chat/completions", json=CHAT).json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= 8


def test_adapter_field_and_model_name_select_the_same_adapter(client):
    base_id = client.get("/v1/models").json()["data"][0]["id"]
    by_field = client.post("/v1/chat/completions", json={**CHAT, "adapter": "all-r8"}).json()
    by_model = client.post("/v1/chat/completions", json={**CHAT, "model": "all-r8"}).json()
    with_base_model = client.post(
        "/v1/chat/completions", json={**CHAT, "model": base_id, "adapter": "all-r8"}
    )
    base = client.post("/v1/chat/completions", json={**CHAT, "model": base_id}).json()
    text = by_field["choices"][0]["message"]["content"]
    assert by_model["choices"][0]["message"]["content"] == text
    assert with_base_model.json()["choices"][0]["message"]["content"] == text
    assert base["choices"][0]["message"]["content"] != text
    assert by_model["model"] == "all-r8"


def test_unknown_adapter_is_an_openai_404_never_the_base(client):
    assert_openai_error(
        client.post("/v1/chat/completions", json={**CHAT, "adapter": "nope"}),
        404,
        "adapter_not_found",
        "adapter",
    )
    assert_openai_error(
        client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}), 404, param="model"
    )
    assert_openai_error(client.post("/v1/completions", json={"prompt": "x", "model": "../etc"}), 404)


def test_conflicting_model_and_adapter(client):
    response = client.post("/v1/chat/completions", json={**CHAT, "model": "attn-r4", "adapter": "all-r8"})
    assert_openai_error(response, 400, "model_adapter_conflict")


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, None),
        ({"messages": [{"role": "user", "content": None}]}, None),
        ({"messages": [{"role": "user", "content": "a\x00b"}]}, None),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 2}, "top_p"),
        ({"temperature": -1}, "temperature"),
        ({"n": 100000}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logprobs": True, "top_logprobs": 99}, "top_logprobs"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_invalid_requests_get_400(client, patch, param, stream):
    error = assert_openai_error(
        client.post("/v1/chat/completions", json={**CHAT, **patch, "stream": stream}), 400
    )
    if param:
        assert error["param"] == param
    assert client.get("/health").status_code == 200


def test_malformed_json_and_lone_surrogate(client):
    bad = client.post("/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert_openai_error(bad, 400)
    surrogate = b'{"messages": [{"role": "user", "content": "\\ud83d"}]}'
    assert_openai_error(
        client.post("/v1/chat/completions", content=surrogate, headers={"content-type": "application/json"}),
        400,
    )


def test_context_length_exceeded(client):
    response = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 300})
    assert_openai_error(response, 400, "context_length_exceeded")


def _sse_events(text: str) -> list:
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streaming_chat_matches_non_streaming(client):
    full = client.post("/v1/chat/completions", json={**CHAT, "adapter": "attn-r4"}).json()
    response = client.post(
        "/v1/chat/completions",
        json={**CHAT, "adapter": "attn-r4", "stream": True, "stream_options": {"include_usage": True}},
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(response.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == full["choices"][0]["message"]["content"]
    finish = [
        e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]
    ]
    assert finish == [full["choices"][0]["finish_reason"]]
    assert events[-1]["choices"] == []
    streamed_usage, full_usage = dict(events[-1]["usage"]), dict(full["usage"])
    # the second request took the first one's prompt blocks from the prefix cache
    assert streamed_usage.pop("prompt_tokens_details")["cached_tokens"] > 0
    full_usage.pop("prompt_tokens_details")
    assert streamed_usage == full_usage


def test_completions_with_n_and_seed(client):
    body = {"prompt": "once upon", "max_tokens": 6, "temperature": 1.0, "seed": 3, "n": 3}
    first = client.post("/v1/completions", json=body).json()
    second = client.post("/v1/completions", json=body).json()
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in second["choices"]]
    assert first["usage"]["completion_tokens"] <= 18 and first["usage"]["prompt_tokens"] == 9


def test_adapter_copied_into_store_at_runtime_is_served(client, adapter_store_dir, tiny_adapter_sources):
    assert_openai_error(client.post("/v1/chat/completions", json={**CHAT, "adapter": "late"}), 404)
    shutil.copytree(tiny_adapter_sources["all-r8"], adapter_store_dir / "late")
    late = client.post("/v1/chat/completions", json={**CHAT, "adapter": "late"}).json()
    same = client.post("/v1/chat/completions", json={**CHAT, "adapter": "all-r8"}).json()
    assert late["choices"][0]["message"]["content"] == same["choices"][0]["message"]["content"]


def test_corrupt_adapter_is_refused_and_others_keep_working(client, adapter_store_dir, tiny_adapter_sources):
    broken = adapter_store_dir / "broken"
    shutil.copytree(tiny_adapter_sources["attn-r4"], broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    error = assert_openai_error(client.post("/v1/chat/completions", json={**CHAT, "adapter": "broken"}), 400)
    assert error["code"] == "adapter_invalid"
    assert client.post("/v1/chat/completions", json={**CHAT, "adapter": "attn-r4"}).status_code == 200
    assert client.post("/v1/adapters/broken/load").status_code == 400
    assert client.get("/ready").status_code == 200


def test_admin_load_unload_upload_delete(client, tiny_adapter_sources):
    assert client.post("/v1/adapters/mlp-r2/load").json()["status"] == "loaded"
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["data"]}
    assert listed["mlp-r2"]["status"] == "loaded" and listed["attn-r4"]["status"] == "on_disk"
    assert listed["all-r8"]["rank"] == 8
    assert client.post("/v1/adapters/mlp-r2/unload").json()["unloaded"] is True
    assert_openai_error(client.post("/v1/adapters/ghost/unload"), 404)

    src = tiny_adapter_sources["attn-r4"]
    files = {
        "adapter_config": ("adapter_config.json", (src / "adapter_config.json").read_bytes()),
        "adapter_model": ("adapter_model.safetensors", (src / "adapter_model.safetensors").read_bytes()),
    }
    assert client.put("/v1/adapters/uploaded", files=files).status_code == 201
    assert client.post("/v1/chat/completions", json={**CHAT, "adapter": "uploaded"}).status_code == 200
    assert client.put("/v1/adapters/uploaded", files=files).status_code == 400  # exists
    bad = {**files, "adapter_model": ("adapter_model.safetensors", b"garbage")}
    assert_openai_error(client.put("/v1/adapters/bad-upload", files=bad), 400, "adapter_invalid")
    assert "bad-upload" not in {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert client.delete("/v1/adapters/uploaded").status_code == 200
    assert_openai_error(client.post("/v1/chat/completions", json={**CHAT, "adapter": "uploaded"}), 404)


def test_vllm_compatible_load_and_unload(client, adapter_store_dir):
    ok = client.post(
        "/v1/load_lora_adapter",
        json={"lora_name": "attn-r4", "lora_path": str(adapter_store_dir / "attn-r4")},
    )
    assert ok.status_code == 200
    outside = client.post("/v1/load_lora_adapter", json={"lora_name": "attn-r4", "lora_path": "/etc"})
    assert_openai_error(outside, 400, "invalid_lora_path")
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "attn-r4"}).status_code == 200
    assert_openai_error(client.post("/v1/unload_lora_adapter", json={"lora_name": "attn-r4"}), 404)


def test_adapter_listing_shows_the_training_card_and_warns_on_another_base(client, adapter_store_dir):
    card = {"summary": {"base_model": "other", "base_weights_sha256": "0" * 64, "final_eval_loss": 0.5}}
    (adapter_store_dir / "attn-r4" / "training_card.json").write_text(json.dumps(card))
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["data"]}
    assert listed["attn-r4"]["training"]["final_eval_loss"] == 0.5
    assert "different base model" in listed["attn-r4"]["warning"]
    assert "warning" not in listed["all-r8"] and "training" not in listed["all-r8"]
