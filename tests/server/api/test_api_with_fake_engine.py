"""API shapes and contracts against a fake engine: no forward pass, so many cases stay cheap."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from tests.server.conftest import tiny_settings
from tests.server.fake_engine import fake_engine_state

PROMPT = "one two three four five"


@pytest.fixture
def fake_app(tiny_base_dir, adapter_store_dir, tmp_path):
    def make(**engine_options):
        settings = tiny_settings(tiny_base_dir, adapter_store_dir, tmp_path, max_loaded_adapters=4)
        return TestClient(create_app(settings, build=fake_engine_state(**engine_options)))

    return make


def events(response) -> list[dict | str]:
    out = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_completions_echo_the_fake_and_count_usage_once_per_prompt(fake_app):
    with fake_app() as client:
        tokenizer = client.app.state.serving.base.tokenizer
        ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 64, "n": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [c["index"] for c in body["choices"]] == [0, 1, 2]
        assert all(
            c["text"] == tokenizer.decode(ids) and c["finish_reason"] == "stop" for c in body["choices"]
        )
        assert body["usage"] == {
            "prompt_tokens": len(ids),
            "completion_tokens": 3 * len(ids),
            "total_tokens": 4 * len(ids),
            "prompt_tokens_details": {"cached_tokens": 0},
        }
        engine = client.app.state.serving.engine
        assert len({g.lease for g in engine.submitted}) == 1  # one lease for the request's 3 choices


def test_chat_stream_shape_with_n_and_usage(fake_app):
    with fake_app() as client:
        body = {
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 4,
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
            "adapter": "attn-r4",
        }
        chunks = events(client.post("/v1/chat/completions", json=body))
        assert chunks[-1] == "[DONE]"
        *data, usage = chunks[:-1]
        opening = [c for c in data if c["choices"][0]["delta"].get("role") == "assistant"]
        assert sorted(c["choices"][0]["index"] for c in opening) == [0, 1]
        finals = [c for c in data if c["choices"][0]["finish_reason"] is not None]
        assert sorted(c["choices"][0]["index"] for c in finals) == [0, 1]
        assert all(c["choices"][0]["finish_reason"] == "length" for c in finals)
        assert all(c["object"] == "chat.completion.chunk" and c["model"] == "attn-r4" for c in data)
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
        assert client.app.state.serving.registry.get("attn-r4").pins == 0


def test_an_engine_failure_mid_stream_is_an_error_event_then_done(fake_app):
    with fake_app(fail_after_tokens=2) as client:
        body = {"prompt": PROMPT, "max_tokens": 10, "stream": True}
        chunks = client.post("/v1/completions", json=body)
        assert "event: error" in chunks.text and chunks.text.rstrip().endswith("data: [DONE]")
        error = json.loads(chunks.text.split("event: error\ndata: ")[1].split("\n")[0])["error"]
        assert error["code"] == "generation_failed" and error["type"] == "server_error"
        r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 10})
        assert r.status_code == 503 and r.json()["error"]["code"] == "generation_failed"
        assert client.app.state.serving.pending == 0


def test_admission_is_released_whatever_the_outcome(fake_app):
    with fake_app() as client:
        state = client.app.state.serving
        for body in (
            {"prompt": PROMPT, "max_tokens": 3},
            {"prompt": PROMPT, "max_tokens": 3, "adapter": "missing"},
            {"prompt": PROMPT, "max_tokens": 3, "stream": True},
            {"prompt": [PROMPT] * 3, "max_tokens": 3, "n": 2, "adapter": "all-r8"},
        ):
            client.post("/v1/completions", json=body)
            assert state.pending == 0, body
        assert all(r.pins == 0 for r in state.registry.resident())
