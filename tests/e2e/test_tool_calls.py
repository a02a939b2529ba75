"""Tool calling through the chat API on the real default model (the tool format needs more context
than the tiny test model has): required and named choices always parse, streams send deltas, tool
turns in the history render, legacy functions map onto tools."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Rome"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 3},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
CHAT = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 60, "temperature": 0}


class Poster:
    """``post(path, json=...)`` against the e2e server."""

    def __init__(self, url: str):
        self.url = url

    def post(self, path: str, json: dict) -> httpx.Response:
        return httpx.post(self.url + path, json=json, timeout=120)


@pytest.fixture(scope="module")
def so_client(server) -> Poster:
    return Poster(server["url"])


def tool_calls(response) -> tuple[list[dict], dict]:
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["message"].get("tool_calls") or [], choice


@pytest.mark.parametrize("adapter", [None, "styleA"])
def test_required_tool_choice_always_gives_a_valid_call(so_client, adapter):
    body = {**CHAT, "tools": [WEATHER, TIME], "tool_choice": "required", "adapter": adapter}
    body["parallel_tool_calls"] = False  # one call, then the grammar is complete and the row stops
    calls, choice = tool_calls(so_client.post("/v1/chat/completions", json=body))
    assert calls and choice["finish_reason"] == "tool_calls"
    for call in calls:
        assert call["type"] == "function" and call["id"]
        arguments = json.loads(call["function"]["arguments"])
        if call["function"]["name"] == "get_weather":
            jsonschema.validate(arguments, WEATHER["function"]["parameters"])
        else:
            assert call["function"]["name"] == "get_time"


def test_a_named_tool_choice_calls_that_tool(so_client):
    body = {
        **CHAT,
        "tools": [WEATHER, TIME],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    calls, _ = tool_calls(so_client.post("/v1/chat/completions", json=body))
    assert calls and {c["function"]["name"] for c in calls} == {"get_weather"}


def test_legacy_functions_map_onto_tools(so_client):
    body = {**CHAT, "functions": [WEATHER["function"]], "function_call": {"name": "get_weather"}}
    calls, _ = tool_calls(so_client.post("/v1/chat/completions", json=body))
    assert calls[0]["function"]["name"] == "get_weather"


def test_streamed_tool_calls_come_as_deltas_that_add_up(so_client):
    body = {
        **CHAT,
        "tools": [WEATHER],
        "tool_choice": "required",
        "stream": True,
        "parallel_tool_calls": False,
    }
    whole, _ = tool_calls(so_client.post("/v1/chat/completions", json={**body, "stream": False}))
    r = so_client.post("/v1/chat/completions", json=body)
    names, arguments, reasons = {}, {}, []
    for line in r.text.splitlines():
        if not line.startswith("data: {"):
            continue
        for choice in json.loads(line[6:])["choices"]:
            reasons.append(choice["finish_reason"])
            for delta in choice["delta"].get("tool_calls") or []:
                if "name" in delta["function"]:
                    assert delta["index"] not in names  # the name comes first, once
                    names[delta["index"]] = delta["function"]["name"]
                arguments[delta["index"]] = arguments.get(delta["index"], "") + delta["function"]["arguments"]
    assert [names[i] for i in sorted(names)] == [c["function"]["name"] for c in whole]
    assert [json.loads(arguments[i]) for i in sorted(arguments)] == [
        json.loads(c["function"]["arguments"]) for c in whole
    ]
    assert "tool_calls" in reasons


def test_tool_results_in_the_history_are_accepted(so_client):
    messages = [
        {"role": "user", "content": "Weather in Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome", "days": 1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"},
    ]
    r = so_client.post("/v1/chat/completions", json={**CHAT, "messages": messages, "tools": [WEATHER]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function"}]}, "tools[0]"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ],
)
def test_bad_tool_requests_are_400_naming_the_field(so_client, extra, param):
    r = so_client.post("/v1/chat/completions", json={**CHAT, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param), r.json()


def test_the_openai_client_reads_tool_calls_and_json_schema(server):
    import openai

    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=CHAT["messages"],
        max_tokens=60,
        temperature=0,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}
    schema["additionalProperties"] = False  # as strict mode requires; else the object may go on
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "Is Paris in France?"}],
        max_tokens=30,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
