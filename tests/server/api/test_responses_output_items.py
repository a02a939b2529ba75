"""The Responses output items read from generated text: calls become function_call items in text
order, and a stream split anywhere builds the items the whole text gives."""

from __future__ import annotations

import pytest

from server.api.responses.output_items import OutputItemStream, output_items

TEXT = (
    'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
    'And the time: <tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
)


def layout(items: list[dict]) -> list[tuple]:
    """What an item says, less its random call id."""
    return [
        (i["type"], i["status"], i["content"][0]["text"])
        if i["type"] == "message"
        else (i["type"], i["status"], i["name"], i["arguments"])
        for i in items
    ]


def test_calls_become_items_in_text_order():
    assert layout(output_items(TEXT, True, "r", "completed")) == [
        ("message", "completed", "Let me check."),
        ("function_call", "completed", "get_weather", '{"city": "Rome"}'),
        ("message", "completed", "And the time:"),
        ("function_call", "completed", "get_time", "{}"),
    ]


@pytest.mark.parametrize(
    ("text", "tools", "expected"),
    [
        ("plain <tool_call>{}", False, [("message", "incomplete", "plain <tool_call>{}")]),
        ("", True, [("message", "incomplete", "")]),
        # cut off by max_output_tokens: the call as far as it was written
        (
            '<tool_call>{"name": "f", "arguments": {"x": 1',
            True,
            [("function_call", "incomplete", "f", '{"x": 1')],
        ),
    ],
)
def test_without_tools_or_calls_the_text_is_one_message_and_a_cut_call_is_incomplete(text, tools, expected):
    assert layout(output_items(text, tools, "r", "incomplete")) == expected


@pytest.mark.parametrize("split", range(0, len(TEXT) + 1, 3))
def test_a_stream_split_anywhere_builds_the_same_items(split):
    stream = OutputItemStream("r", tools=True)
    events = [
        *stream.start(),
        *stream.feed(TEXT[:split]),
        *stream.feed(TEXT[split:]),
        *stream.finish("completed"),
    ]
    assert layout(stream.items) == layout(output_items(TEXT, True, "r", "completed"))
    for index, item in enumerate(stream.items):
        if item["type"] == "function_call":
            deltas = [
                f["delta"]
                for kind, f in events
                if kind.endswith("arguments.delta") and f["output_index"] == index
            ]
            assert "".join(deltas) == item["arguments"]
    assert [f["output_index"] for kind, f in events if kind == "response.output_item.done"] == [0, 1, 2, 3]
