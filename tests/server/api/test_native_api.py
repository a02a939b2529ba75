"""LoRAX's and TGI's native routes against the fake engine: shapes, parameters, refusals, errors."""

from __future__ import annotations

import json

import lorax.types
import pytest
import text_generation.types
import yaml
from fastapi.testclient import TestClient

from server.app import create_app
from tests.server.conftest import tiny_settings
from tests.server.fake_engine import fake_engine_state

PROMPT = "one two three four five"
ADMIN, ALICE = "sk-admin-native", "sk-alice-native"


@pytest.fixture
def native_app(tiny_base_dir, adapter_store_dir, tmp_path):
    def make(keys: bool = False, **engine_options) -> TestClient:
        overrides = {"max_loaded_adapters": 4}
        if keys:
            keys_file = tmp_path / "keys.yaml"
            entries = [
                {"key": ADMIN, "role": "admin"},
                {"key": ALICE, "role": "user", "adapters": ["attn-*"]},
            ]
            keys_file.write_text(yaml.safe_dump({"keys": entries}))
            overrides["api_keys_file"] = keys_file
        settings = tiny_settings(tiny_base_dir, adapter_store_dir, tmp_path, **overrides)
        return TestClient(create_app(settings, build=fake_engine_state(**engine_options)))

    return make


def prompt_ids(client: TestClient) -> list[int]:
    return client.app.state.serving.base.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]


def stream_events(response) -> list[dict]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return [
        json.loads(line[len("data:") :]) for line in response.text.splitlines() if line.startswith("data:")
    ]


def test_generate_answers_generated_text_and_details_on_request(native_app):
    with native_app() as client:
        ids = prompt_ids(client)
        tokenizer = client.app.state.serving.base.tokenizer
        plain = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
        assert plain.status_code == 200, plain.text
        assert plain.json() == {"generated_text": tokenizer.decode(ids[:3])}
        r = client.post(
            "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "details": True}}
        )
        body = r.json()
        details = body["details"]
        assert details["finish_reason"] == "length" and details["generated_tokens"] == 3
        assert details["prompt_tokens"] == len(ids) and details["prefill"] == [] and details["seed"] is None
        assert [t["id"] for t in details["tokens"]] == ids[:3]
        assert all(t["logprob"] <= 0 and t["special"] is False for t in details["tokens"])
        assert "".join(t["text"] for t in details["tokens"]) == body["generated_text"]
        text_generation.types.Response(**body)  # what the TGI client parses


def test_a_generation_that_ends_by_itself_is_an_eos_finish(native_app):
    with native_app() as client:
        r = client.post(
            "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 64, "details": True}}
        )
        assert r.json()["details"]["finish_reason"] == "eos_token"


def test_compat_route_answers_a_list_or_a_stream(native_app):
    with native_app() as client:
        ids = prompt_ids(client)
        listed = client.post(
            "/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}, "stream": False}
        )
        assert isinstance(listed.json(), list) and len(listed.json()) == 1
        streamed = client.post(
            "/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}, "stream": True}
        )
        assert [e["token"]["id"] for e in stream_events(streamed)] == ids[:2]


def test_stream_sends_one_event_per_token_and_the_end_on_the_last(native_app):
    with native_app() as client:
        ids = prompt_ids(client)
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "details": True}}
        events = stream_events(client.post("/generate_stream", json=body))
        assert [e["token"]["id"] for e in events] == ids[:4]
        *tokens, last = events
        assert all(e["generated_text"] is None and e["details"] is None for e in tokens)
        assert last["generated_text"] == "".join(e["token"]["text"] for e in events)
        assert last["details"] == {
            "finish_reason": "length",
            "prompt_tokens": len(ids),
            "generated_tokens": 4,
            "seed": None,
        }
        for event in events:
            text_generation.types.StreamResponse(**event)
        plain = stream_events(client.post("/generate_stream", json={"inputs": PROMPT}))
        assert plain[-1]["details"] is None and plain[-1]["generated_text"]


def test_return_full_text_prepends_the_inputs(native_app):
    with native_app() as client:
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "return_full_text": True}}
        generated = client.post("/generate", json=body).json()["generated_text"]
        assert generated.startswith(PROMPT) and len(generated) > len(PROMPT)


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({}, (0.0, 1.0, 0, None)),  # greedy: TGI's default
        ({"do_sample": False}, (0.0, 1.0, 0, None)),
        ({"do_sample": True, "seed": 5}, (1.0, 1.0, 0, 5)),
        ({"temperature": 0.7}, (0.7, 1.0, 0, None)),  # TGI samples once a sampling parameter is set
        ({"do_sample": True, "top_p": 0.9, "top_k": 40, "temperature": 0.5}, (0.5, 0.9, 40, None)),
    ],
)
def test_sampling_parameters_reach_the_engine(native_app, parameters, expected):
    with native_app() as client:
        r = client.post(
            "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2, **parameters}}
        )
        assert r.status_code == 200, r.text
        sampling = client.app.state.serving.engine.submitted[-1].sampling
        assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed) == expected
        assert sampling.max_tokens == 2


def test_stop_and_ignore_eos_reach_the_engine(native_app):
    with native_app() as client:
        parameters = {"stop": ["four"], "ignore_eos_token": True, "frequency_penalty": 0.5}
        client.post("/generate", json={"inputs": PROMPT, "parameters": parameters})
        sampling = client.app.state.serving.engine.submitted[-1].sampling
        assert sampling.stop == ("four",) and sampling.ignore_eos and sampling.frequency_penalty == 0.5


def test_what_each_client_sends_by_default_is_accepted(native_app):
    lorax_body = lorax.types.Request(inputs=PROMPT, parameters=lorax.types.Parameters()).model_dump(
        by_alias=True
    )
    tgi_body = text_generation.types.Request(
        inputs=PROMPT, parameters=text_generation.types.Parameters(details=True), stream=False
    ).model_dump()
    with native_app() as client:
        for body in (lorax_body, tgi_body):
            r = client.post("/", json=body)
            assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("repetition_penalty", 1.2),
        ("decoder_input_details", True),
        ("response_format", {"type": "json_object", "schema": {}}),
        ("grammar", {"type": "json", "value": {}}),
        ("watermark", True),
        ("top_n_tokens", 2),
        ("return_k_alternatives", 2),
        ("best_of", 2),
        ("typical_p", 0.5),
        ("truncate", 10),
        ("api_token", "hf_secret"),
        ("adapter_source", "hub"),
        ("adapter_source", "s3"),
        ("no_such_parameter", 1),
    ],
)
def test_parameters_that_cannot_be_honoured_are_refused_by_name(native_app, field, value):
    with native_app() as client:
        r = client.post("/generate", json={"inputs": PROMPT, "parameters": {field: value}})
        assert r.status_code == 400, r.text
        error = r.json()
        assert error["error_type"] == "validation" and error["param"] == f"parameters.{field}"
        assert field in error["error"]
        assert client.app.state.serving.engine.submitted == []


def test_a_body_that_is_not_json_is_a_validation_error(native_app):
    with native_app() as client:
        for content in (b"\x00\x00", b"{not json"):
            r = client.post("/generate", content=content, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error_type"] == "validation", r.text


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": ""},
        {"inputs": PROMPT, "parameters": {"max_new_tokens": 0}},
        {"inputs": PROMPT, "parameters": {"top_k": 0}},
        {"inputs": PROMPT, "parameters": {"temperature": -1}},
        {"inputs": PROMPT, "parameters": {"stop": ["a", "b", "c", "d", "e"]}},
        {"inputs": PROMPT, "parameters": {"stop": [""]}},
        {"inputs": PROMPT, "parameters": {"adapter_id": "attn-r4", "merged_adapters": {"ids": ["attn-r4"]}}},
        {"inputs": PROMPT, "stream": True},
    ],
)
def test_invalid_requests_are_validation_errors(native_app, body):
    with native_app() as client:
        r = client.post("/generate", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error_type"] == "validation" and "validation error for" not in r.json()["error"]


def test_adapter_id_and_merged_adapters_choose_the_adapter(native_app):
    with native_app() as client:
        engine = client.app.state.serving.engine
        r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "attn-r4"}})
        assert r.status_code == 200, r.text
        assert engine.submitted[-1].adapter == "attn-r4"
        merge = {
            "ids": ["attn-r4", "all-r8"],
            "weights": [0.5, 0.5],
            "merge_strategy": "cat",
            "density": 0.0,
        }
        r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"merged_adapters": merge}})
        assert r.status_code == 200, r.text
        assert engine.submitted[-1].adapter.startswith("merge-")
        missing = client.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "missing"}})
        assert missing.status_code == 404
        assert (
            missing.json()["error_type"] == "not_found" and missing.json()["param"] == "parameters.adapter_id"
        )
        bad = {**merge, "ids": ["attn-r4", "missing"]}
        r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"merged_adapters": bad}})
        assert r.status_code == 404 and r.json()["param"] == "parameters.merged_adapters.ids[1]"
        assert all(a.pins == 0 for a in client.app.state.serving.registry.resident())


def test_tenancy_and_auth_hold_on_every_native_route(native_app):
    with native_app(keys=True) as client:
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
        for method, path in (
            ("post", "/generate"),
            ("post", "/generate_stream"),
            ("post", "/"),
            ("get", "/info"),
        ):
            r = client.request(method.upper(), path, json=body if method == "post" else None)
            assert r.status_code == 401, path
            assert r.json()["error_type"] == "authentication"
        alice = {"Authorization": f"Bearer {ALICE}"}
        mine = {"inputs": PROMPT, "parameters": {"adapter_id": "attn-r4"}}
        assert client.post("/generate", json=mine, headers=alice).status_code == 200
        theirs = client.post(
            "/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "all-r8"}}, headers=alice
        )
        missing = client.post(
            "/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "nope"}}, headers=alice
        )
        assert theirs.status_code == missing.status_code == 404
        assert theirs.json()["error"].replace("all-r8", "X") == missing.json()["error"].replace("nope", "X")
        merge = {"ids": ["attn-r4", "all-r8"], "weights": [1, 1], "density": 0.0}
        r = client.post(
            "/generate", json={"inputs": PROMPT, "parameters": {"merged_adapters": merge}}, headers=alice
        )
        assert r.status_code == 404


def test_engine_failures_are_generation_errors(native_app):
    with native_app(fail_after_tokens=1) as client:
        r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}})
        assert r.status_code == 503 and r.json()["error_type"] == "generation"
        events = stream_events(client.post("/generate_stream", json={"inputs": PROMPT}))
        assert events[-1]["error_type"] == "generation" and "error" in events[-1]
        assert client.app.state.serving.pending == 0


def test_info_describes_the_model_and_its_limits(native_app):
    with native_app() as client:
        info = client.get("/info").json()
        state = client.app.state.serving
        assert info["model_id"] == state.model_id and info["max_total_tokens"] == state.context_length
        assert info["max_input_tokens"] < info["max_total_tokens"] and info["adapter_source"] == "local"
        assert info["version"] == client.app.version and info["model_device_type"] == "cpu"
