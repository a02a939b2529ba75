"""The official ``openai`` client's Responses API against a real server on the tiny model: greedy
output equals chat completions on the same conversation and adapter."""

from __future__ import annotations

import shutil

import openai
import pytest

from tests.server.conftest import tiny_settings
from tests.server.live_server import live_server

INSTRUCTIONS = "Answer briefly."
QUESTION = "Name a colour."
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def client(tiny_base_dir, tiny_adapter_sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("responses-clients")
    store = root / "adapters"
    store.mkdir()
    shutil.copytree(tiny_adapter_sources["attn-r4"], store / "attn-r4")
    with live_server(tiny_settings(tiny_base_dir, store, root)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0)


def chat_text(client: openai.OpenAI, model: str) -> str:
    """The reference: the same conversation through chat completions."""
    completion = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    return completion.choices[0].message.content


@pytest.mark.parametrize("model", ["base", "attn-r4"])
def test_responses_create_equals_chat(client, model):
    model_id = client.models.list().data[0].id if model == "base" else model
    response = client.responses.create(
        model=model_id, instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=MAX_TOKENS, temperature=0
    )
    assert response.object == "response" and response.model == model_id
    assert response.status in ("completed", "incomplete")
    assert response.output_text == chat_text(client, model_id)
    assert response.usage.output_tokens <= MAX_TOKENS
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


def test_message_list_input_with_text_parts(client):
    model_id = client.models.list().data[0].id
    response = client.responses.create(
        model=model_id,
        input=[
            {"role": "system", "content": INSTRUCTIONS},
            {"role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
        ],
        max_output_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert response.output_text == chat_text(client, model_id)


def test_responses_stream_events(client):
    stream = client.responses.create(
        model="attn-r4",
        input=QUESTION,
        instructions=INSTRUCTIONS,
        max_output_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == chat_text(client, "attn-r4") == events[-1].response.output_text


def test_refusals_reach_the_client_as_bad_requests(client):
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model="attn-r4", input=QUESTION, previous_response_id="resp_1")
    with pytest.raises(openai.BadRequestError, match="store"):
        client.responses.create(model="attn-r4", input=QUESTION, store=True)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="missing", input=QUESTION)
