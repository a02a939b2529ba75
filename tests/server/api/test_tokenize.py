"""POST /tokenize and /detokenize: the counts the server itself uses, round trips, errors, tenancy."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from tests.server.api.test_models_retrieve import ALICE, auth, secured_settings

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]


def assert_error(response, status: int, code: str | None, param: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param)


def test_messages_count_equals_chat_usage_prompt_tokens(client):
    tokenized = client.post("/tokenize", json={"messages": MESSAGES}).json()
    chat = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}).json()
    assert tokenized["count"] == len(tokenized["tokens"]) == chat["usage"]["prompt_tokens"]
    assert tokenized["max_model_len"] == 256  # the server's context window (max_model_len in the test)


TOOL = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
TOOL_HISTORY = [
    {"role": "user", "content": "Time?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "noon"},
]


@pytest.mark.parametrize(
    "fields",
    [
        {"tools": [TOOL]},
        {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
        {"functions": [TOOL["function"]]},
        {"tools": [TOOL], "tool_choice": "none"},
    ],
)
def test_tools_render_as_chat_renders_them(long_context_client, fields):
    client = long_context_client
    body = {"messages": TOOL_HISTORY, **fields}
    tokenized = client.post("/tokenize", json=body)
    assert tokenized.status_code == 200, tokenized.text
    assert client.post("/v1/chat/completions", json={**body, "max_tokens": 1}).status_code == 200
    assert tokenized.json()["tokens"] == client.app.state.serving.engine.submitted[-1].prompt_token_ids
    plain = client.post("/tokenize", json={"messages": TOOL_HISTORY}).json()["count"]
    assert (tokenized.json()["count"] > plain) == (fields.get("tool_choice") != "none")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MESSAGES, "tool_choice": "required"}, "tool_choice"),
        (
            {
                "messages": MESSAGES,
                "tools": [TOOL],
                "tool_choice": {"type": "function", "function": {"name": "x"}},
            },
            "tool_choice",
        ),
        ({"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools[0]"),
        ({"prompt": "hi", "tools": [TOOL]}, None),
    ],
)
def test_bad_tools_are_refused_by_name(long_context_client, body, param):
    r = long_context_client.post("/tokenize", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_generation_prompt_is_a_suffix_that_can_be_left_out(client):
    with_prompt = client.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    without = client.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert with_prompt[: without["count"]] == without["tokens"]
    assert without["count"] < len(with_prompt)


def test_prompt_count_equals_completions_usage_prompt_tokens(client):
    prompt = "Once upon a time"
    tokenized = client.post("/tokenize", json={"prompt": prompt}).json()
    completion = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}).json()
    assert tokenized["count"] == completion["usage"]["prompt_tokens"]
    by_ids = client.post("/v1/completions", json={"prompt": tokenized["tokens"], "max_tokens": 2}).json()
    assert by_ids["usage"]["prompt_tokens"] == tokenized["count"]


def test_detokenize_round_trip(client):
    prompt = "Grüße, 世界! tabs\tand\nnew lines"
    tokens = client.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    assert client.post("/detokenize", json={"tokens": tokens}).json() == {"prompt": prompt}


def test_model_may_be_the_base_or_an_adapter_with_the_same_tokens(client):
    base_id = client.get("/v1/models").json()["data"][0]["id"]
    expected = client.post("/tokenize", json={"prompt": "hello"}).json()
    for model in (base_id, "attn-r4"):
        assert client.post("/tokenize", json={"model": model, "prompt": "hello"}).json() == expected
    decoded = client.post("/detokenize", json={"model": "attn-r4", "tokens": expected["tokens"]}).json()
    assert decoded == {"prompt": "hello"}


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "param"),
    [
        ("/detokenize", {"tokens": [10**9]}, 400, "invalid_value", "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "invalid_value", "tokens"),
        ("/tokenize", {"model": "nope", "prompt": "hi"}, 404, "model_not_found", "model"),
        ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model_not_found", "model"),
        ("/tokenize", {"prompt": "hi", "messages": MESSAGES}, 400, "invalid_request", None),
        ("/tokenize", {}, 400, "invalid_request", None),
        ("/tokenize", {"prompt": "hi", "add_generation_prompt": False}, 400, "invalid_request", None),
        ("/tokenize", {"messages": MESSAGES, "add_special_tokens": True}, 400, "invalid_request", None),
        (
            "/tokenize",
            {"prompt": "hi", "return_token_strs": True},
            400,
            "invalid_request",
            "return_token_strs",
        ),
    ],
)
def test_errors(client, path, body, status, code, param):
    assert_error(client.post(path, json=body), status, code, param)


def test_a_user_key_cannot_tokenize_with_another_tenants_adapter(
    tiny_base_dir, adapter_store_dir, tmp_path, tiny_adapter_sources
):
    settings = secured_settings(tiny_base_dir, adapter_store_dir, tmp_path, tiny_adapter_sources)
    with TestClient(create_app(settings), raise_server_exceptions=False) as secured:
        assert secured.post("/tokenize", json={"prompt": "hi"}).status_code == 401
        own = secured.post("/tokenize", json={"model": "alice-one", "prompt": "hi"}, headers=auth(ALICE))
        assert own.status_code == 200, own.text
        other = secured.post("/tokenize", json={"model": "bob-secret", "prompt": "hi"}, headers=auth(ALICE))
        assert_error(other, 404, "model_not_found", "model")
