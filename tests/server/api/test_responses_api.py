"""POST /v1/responses against the fake engine: the response object, its event stream, refusals."""

from __future__ import annotations

import json

import openai.types.responses as openai_responses
import pytest
from fastapi.testclient import TestClient
from openai.types.responses import Response

from server.api.engine_request import render_chat
from server.app import create_app
from tests.server.conftest import tiny_settings
from tests.server.fake_engine import fake_engine_state

# The openai client's class for each event type this server sends.
EVENT_CLASSES = {
    "response.created": openai_responses.ResponseCreatedEvent,
    "response.in_progress": openai_responses.ResponseInProgressEvent,
    "response.output_item.added": openai_responses.ResponseOutputItemAddedEvent,
    "response.content_part.added": openai_responses.ResponseContentPartAddedEvent,
    "response.output_text.delta": openai_responses.ResponseTextDeltaEvent,
    "response.output_text.done": openai_responses.ResponseTextDoneEvent,
    "response.content_part.done": openai_responses.ResponseContentPartDoneEvent,
    "response.output_item.done": openai_responses.ResponseOutputItemDoneEvent,
    "response.completed": openai_responses.ResponseCompletedEvent,
    "response.incomplete": openai_responses.ResponseIncompleteEvent,
    "response.failed": openai_responses.ResponseFailedEvent,
    "response.function_call_arguments.delta": openai_responses.ResponseFunctionCallArgumentsDeltaEvent,
    "response.function_call_arguments.done": openai_responses.ResponseFunctionCallArgumentsDoneEvent,
    "error": openai_responses.ResponseErrorEvent,
}


def validate_event(event: dict) -> None:
    EVENT_CLASSES[event["type"]].model_validate(event)


@pytest.fixture
def fake_app(tiny_base_dir, adapter_store_dir, tmp_path):
    def make(**engine_options) -> TestClient:
        settings = tiny_settings(tiny_base_dir, adapter_store_dir, tmp_path, max_loaded_adapters=4)
        return TestClient(create_app(settings, build=fake_engine_state(**engine_options)))

    return make


def sse_events(response) -> list[dict]:
    assert response.status_code == 200, response.text
    names, events = [], []
    for line in response.text.splitlines():
        if line.startswith("event: "):
            names.append(line[len("event: ") :])
        elif line.startswith("data: "):
            events.append(json.loads(line[len("data: ") :]))
    assert names == [e["type"] for e in events]
    return events


def test_a_string_input_answers_a_response_object(fake_app):
    with fake_app() as client:
        state = client.app.state.serving
        prompt = render_chat(state, [{"role": "user", "content": "hi"}])
        r = client.post("/v1/responses", json={"input": "hi", "max_output_tokens": 200})
        assert r.status_code == 200, r.text
        response = Response.model_validate(r.json())
        assert response.object == "response" and response.status == "completed"
        assert response.model == state.model_id and response.id.startswith("resp_")
        (message,) = response.output
        assert message.type == "message" and message.role == "assistant" and message.status == "completed"
        assert response.output_text == state.base.tokenizer.decode(prompt, skip_special_tokens=True)
        assert message.content[0].annotations == []
        assert response.usage.input_tokens == len(prompt)
        assert response.usage.total_tokens == len(prompt) + response.usage.output_tokens
        assert r.json()["store"] is False and response.tools == []


def test_max_output_tokens_makes_it_incomplete(fake_app):
    with fake_app() as client:
        r = client.post("/v1/responses", json={"input": "hi", "max_output_tokens": 3})
        body = r.json()
        assert body["status"] == "incomplete" and body["incomplete_details"] == {
            "reason": "max_output_tokens"
        }
        assert body["usage"]["output_tokens"] == 3
        assert client.app.state.serving.engine.submitted[-1].sampling.max_tokens == 3


def test_instructions_and_messages_render_exactly_as_chat(fake_app):
    with fake_app() as client:
        engine = client.app.state.serving.engine
        body = {
            "instructions": "Be brief.",
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "one "},
                        {"type": "input_text", "text": "two"},
                    ],
                },
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "ok", "annotations": []}],
                },
                {"role": "developer", "content": "three"},
            ],
        }
        assert client.post("/v1/responses", json=body).status_code == 200
        chat = {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "one two"},
                {"role": "assistant", "content": "ok"},
                {"role": "developer", "content": "three"},
            ]
        }
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
        responses_prompt, chat_prompt = (g.prompt_token_ids for g in engine.submitted[-2:])
        assert responses_prompt == chat_prompt


@pytest.mark.parametrize("selector", [{"adapter": "attn-r4"}, {"model": "attn-r4"}])
def test_the_adapter_field_or_model_chooses_the_adapter(fake_app, selector):
    with fake_app() as client:
        r = client.post("/v1/responses", json={"input": "hi", "temperature": 0.5, "top_p": 0.9, **selector})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "attn-r4" and r.json()["adapter"] == "attn-r4"
        submitted = client.app.state.serving.engine.submitted[-1]
        assert submitted.adapter == "attn-r4"
        assert (submitted.sampling.temperature, submitted.sampling.top_p) == (0.5, 0.9)
        missing = client.post("/v1/responses", json={"input": "hi", "adapter": "missing"})
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "adapter"


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("previous_response_id", "resp_123", "previous_response_id"),
        ("store", True, "store"),
        ("background", True, "background"),
        ("tool_choice", "required", "tool_choice"),  # needs tools
        ("tools", [{"type": "web_search"}], "tools[0]"),
        ("tools", [{"type": "function", "parameters": {}}], "tools[0]"),
        (
            "text",
            {"format": {"type": "json_schema", "name": "x", "schema": {"not": {}}}},
            "text.format.schema",
        ),
        ("text", {"format": {"type": "json_schema", "name": "x"}}, "text.format"),
        ("text", {"format": {"type": "yaml"}}, "text.format.type"),
        ("max_tool_calls", 1, "max_tool_calls"),
        ("reasoning", {"effort": "low"}, "reasoning"),
        ("include", ["message.output_text.logprobs"], "include"),
        ("metadata", {"k": "v"}, "metadata"),
        ("truncation", "auto", "truncation"),
        ("seed", 1, "seed"),
    ],
)
def test_what_is_not_implemented_is_refused_by_name(fake_app, field, value, param):
    with fake_app() as client:
        r = client.post("/v1/responses", json={"input": "hi", field: value})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
        assert client.app.state.serving.engine.submitted == []


def test_no_op_values_of_refused_fields_are_accepted(fake_app):
    with fake_app() as client:
        body = {
            "input": "hi",
            "store": False,
            "tools": [],
            "tool_choice": "auto",
            "text": {"format": {"type": "text"}},
        }
        assert client.post("/v1/responses", json=body).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"input": []},
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
        {"input": [{"type": "function_call_output", "call_id": "c"}]},
        {"input": "hi", "max_output_tokens": 0},
    ],
)
def test_inputs_this_server_cannot_read_are_refused(fake_app, body):
    with fake_app() as client:
        assert client.post("/v1/responses", json=body).status_code == 400


def test_the_stream_sends_openai_events_in_order(fake_app):
    with fake_app() as client:
        events = sse_events(
            client.post("/v1/responses", json={"input": "hi", "stream": True, "max_output_tokens": 5})
        )
        for event in events:
            validate_event(event)  # every event parses as the openai client's type
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        kinds = [e["type"] for e in events]
        deltas = kinds.count("response.output_text.delta")
        assert deltas >= 1
        assert kinds == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            *["response.output_text.delta"] * deltas,
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.incomplete",  # max_output_tokens ended it
        ]
        text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        done = events[kinds.index("response.output_text.done")]
        assert done["text"] == text
        final = events[-1]["response"]
        assert final["output"][0]["content"][0]["text"] == text and final["usage"]["output_tokens"] == 5
        assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["usage"] is None
        complete = sse_events(
            client.post("/v1/responses", json={"input": "hi", "stream": True, "max_output_tokens": 200})
        )
        assert (
            complete[-1]["type"] == "response.completed" and complete[-1]["response"]["status"] == "completed"
        )


def test_an_engine_failure_is_an_error_event_then_response_failed(fake_app):
    with fake_app(fail_after_tokens=1) as client:
        events = sse_events(client.post("/v1/responses", json={"input": "hi", "stream": True}))
        assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
        assert events[-2]["code"] == "generation_failed"
        assert events[-1]["response"]["status"] == "failed"
        assert events[-1]["response"]["error"]["code"] == "server_error"
        validate_event(events[-1])
        r = client.post("/v1/responses", json={"input": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "generation_failed"
        assert client.app.state.serving.pending == 0


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
CHAT_WEATHER = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
# A conversation whose history holds a call: the fake engine echoes the prompt, so its output holds
# that call's <tool_call> block, as a model's would.
CALL_HISTORY = [
    {"role": "user", "content": "Weather in Rome?"},
    {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Rome"}'},
    {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
]
CHAT_HISTORY = [
    {"role": "user", "content": "Weather in Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


def test_tools_and_text_format_go_through_chat_s_prompt_and_grammar(long_context_client):
    client = long_context_client
    engine = client.app.state.serving.engine
    pairs = [
        (
            {"tools": [WEATHER], "tool_choice": "required"},
            {"tools": [CHAT_WEATHER], "tool_choice": "required"},
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}},
            {
                "tools": [CHAT_WEATHER],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            },
        ),
        (
            {"text": {"format": {"type": "json_schema", "name": "w", "schema": WEATHER["parameters"]}}},
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "w", "schema": WEATHER["parameters"]},
                }
            },
        ),
        ({"text": {"format": {"type": "json_object"}}}, {"response_format": {"type": "json_object"}}),
    ]
    for responses_fields, chat_fields in pairs:
        r = client.post(
            "/v1/responses", json={"input": CALL_HISTORY, "max_output_tokens": 1, **responses_fields}
        )
        assert r.status_code == 200, r.text
        chat = {"messages": CHAT_HISTORY, "max_tokens": 1, **chat_fields}
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
        responses_run, chat_run = engine.submitted[-2:]
        assert responses_run.prompt_token_ids == chat_run.prompt_token_ids
        assert responses_run.sampling.grammar is not None
        assert responses_run.sampling.grammar == chat_run.sampling.grammar
    assert r.json()["text"] == {"format": {"type": "json_object"}}


def test_function_calls_in_the_output_are_function_call_items(long_context_client):
    client = long_context_client
    body = {"input": CALL_HISTORY, "tools": [WEATHER], "max_output_tokens": 4000}
    r = client.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    response = Response.model_validate(r.json())
    calls = [item for item in response.output if item.type == "function_call"]
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Rome"}')]
    assert calls[0].call_id.startswith("call_") and calls[0].id.startswith("fc_")
    assert response.output[0].type == "message"  # the echoed text around the call
    assert '"arguments": {"city": "Rome"}' not in response.output_text  # the call left the text
    assert r.json()["tools"] == [WEATHER]


def test_streamed_function_calls_send_argument_deltas_that_add_up(long_context_client):
    client = long_context_client
    body = {"input": CALL_HISTORY, "tools": [WEATHER], "max_output_tokens": 4000, "stream": True}
    events = sse_events(client.post("/v1/responses", json=body))
    for event in events:
        validate_event(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    added = [e for e in events if e["type"] == "response.output_item.added"]
    done = [e for e in events if e["type"] == "response.output_item.done"]
    assert [e["output_index"] for e in added] == [e["output_index"] for e in done] == list(range(len(added)))
    (call,) = [e["item"] for e in done if e["item"]["type"] == "function_call"]
    index = next(e["output_index"] for e in done if e["item"] is not None and e["item"]["id"] == call["id"])
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert "".join(deltas) == call["arguments"] == '{"city": "Rome"}'
    (arguments_done,) = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert arguments_done["output_index"] == index and arguments_done["arguments"] == call["arguments"]
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["output"] == [e["item"] for e in done]
    whole = client.post("/v1/responses", json={**body, "stream": False}).json()["output"]
    assert [(i["type"], i.get("name"), i.get("arguments")) for i in whole] == [
        (i["type"], i.get("name"), i.get("arguments")) for i in events[-1]["response"]["output"]
    ]
