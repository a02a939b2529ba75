"""Structured outputs per row: constrained rows obey their grammar, free rows beside them are unchanged."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest

from tests.server.conftest import shared_client

CHAT = {"messages": [{"role": "user", "content": "Answer me."}], "max_tokens": 40, "temperature": 0}
FLAG_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
    "required": ["ok", "color"],
    "additionalProperties": False,
}
CODE = "[0-9]{3}-[a-z]{2}"
DIGIT = {"type": "integer", "minimum": 0, "maximum": 9}


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


FLAG_FORMAT = schema_format(FLAG_SCHEMA)


@pytest.fixture(scope="module")
def so_client(tiny_base_dir, tiny_adapter_sources, tmp_path_factory):
    with shared_client(
        tmp_path_factory,
        tiny_base_dir,
        tiny_adapter_sources,
        "structured",
        max_loaded_adapters=4,
        dtype="float32",
    ) as client:
        yield client


def content(r) -> tuple[str, str]:
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


@pytest.mark.parametrize("adapter", [None, "attn-r4"])
def test_json_schema_output_validates(so_client, adapter):
    body = {**CHAT, "adapter": adapter}
    body["response_format"] = {"type": "json_schema", "json_schema": {"name": "flag", "schema": FLAG_SCHEMA}}
    text, reason = content(so_client.post("/v1/chat/completions", json=body))
    jsonschema.validate(json.loads(text), FLAG_SCHEMA)
    assert reason == "stop"


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
        ({"guided_choice": ["left", "right"]}, lambda t: t in ("left", "right")),
        (
            {"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}},
            lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t),
        ),
        ({"guided_regex": "(cat|dog)s?"}, lambda t: re.fullmatch("(cat|dog)s?", t)),
        ({"guided_grammar": 'root ::= "A" | "B" "C"'}, lambda t: t in ("A", "BC")),
        (
            {"guided_json": json.dumps({"type": "integer", "minimum": 0, "maximum": 9})},
            lambda t: 0 <= int(t) <= 9,
        ),
    ],
)
def test_choice_regex_grammar_rows(so_client, extra, check):
    text, reason = content(so_client.post("/v1/chat/completions", json={**CHAT, **extra}))
    assert check(text), text
    assert reason == "stop"


def test_completions_take_constraints_too(so_client):
    r = so_client.post(
        "/v1/completions", json={"prompt": "x", "max_tokens": 8, "guided_choice": ["up", "down"]}
    )
    assert r.status_code == 200 and r.json()["choices"][0]["text"] in ("up", "down")


def test_free_rows_beside_constrained_rows_equal_their_solo_outputs(so_client):
    free = [{**CHAT, "adapter": a, "max_tokens": 12} for a in (None, "mlp-r2", "all-r8")]
    constrained = [
        {**CHAT, "adapter": "attn-r4", "structured_outputs": {"choice": ["alpha", "beta"]}},
        {
            **CHAT,
            "response_format": {"type": "json_schema", "json_schema": {"name": "f", "schema": FLAG_SCHEMA}},
        },
    ]
    solo = [content(so_client.post("/v1/chat/completions", json=b))[0] for b in free]
    results: dict[int, str] = {}

    def run(i: int, body: dict) -> None:
        results[i] = content(so_client.post("/v1/chat/completions", json=body))[0]

    threads = [threading.Thread(target=run, args=(i, b)) for i, b in enumerate(free + constrained)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results[i] for i in range(len(free))] == solo
    assert results[len(free)] in ("alpha", "beta")
    jsonschema.validate(json.loads(results[len(free) + 1]), FLAG_SCHEMA)


def test_streamed_constrained_output(so_client):
    body = {**CHAT, "stream": True, "structured_outputs": {"choice": ["north", "south"]}}
    r = so_client.post("/v1/chat/completions", json=body)
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in r.text.splitlines()
        if line.startswith("data: {") and json.loads(line[6:])["choices"]
    )
    assert text in ("north", "south")


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        ({"response_format": schema_format({"not": {}})}, "response_format.json_schema.schema", "not"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
        ({"structured_outputs": {"regex": "("}}, "structured_outputs.regex", ""),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty"),
        ({"structured_outputs": {"json": "{", "regex": "a"}}, "structured_outputs", "exactly one"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "one output constraint"),
        ({"guided_grammar": "root ::= ("}, "guided_grammar", ""),
    ],
)  # fmt: skip
def test_bad_constraints_are_400_naming_the_field(so_client, extra, param, says):
    r = so_client.post("/v1/chat/completions", json={**CHAT, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == "grammar_invalid", error
    assert says in error["message"]
    assert so_client.get("/ready").status_code == 200
