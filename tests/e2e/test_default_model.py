"""End to end: the official `openai` client against a real server process on the default model."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, **kwargs) -> str:
    response = client.chat.completions.create(
        model=kwargs.pop("model", "SmolLM2-135M-Instruct"),
        messages=QUESTION,
        max_tokens=12,
        temperature=0,
        **kwargs,
    )
    return response.choices[0].message.content


def test_base_model_chat_answers(client):
    models = [m.id for m in client.models.list().data]
    assert models[0] == "SmolLM2-135M-Instruct" and {"styleA", "styleB"} <= set(models)
    assert "Paris" in ask(client)


def test_stream_equals_non_stream(client):
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=QUESTION,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ask(client)
    assert chunks[-1].usage.completion_tokens > 0


def test_adapter_by_field_and_by_model(client):
    by_field = ask(client, extra_body={"adapter": "styleB"})
    assert by_field == ask(client, model="styleB")
    assert by_field != ask(client)


def test_unknown_adapter_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        ask(client, extra_body={"adapter": "does-not-exist"})
    assert info.value.body["code"] == "adapter_not_found"


def test_adapter_copied_at_runtime_and_corrupt_adapter_refused_while_serving(
    client, server, e2e_adapter_sources
):
    shutil.copytree(e2e_adapter_sources["styleA"], server["store"] / "runtime-copy")
    assert ask(client, extra_body={"adapter": "runtime-copy"}) == ask(
        client, extra_body={"adapter": "styleA"}
    )

    corrupt = server["store"] / "corrupt"
    shutil.copytree(e2e_adapter_sources["styleA"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with ThreadPoolExecutor(4) as pool:
        good = [pool.submit(ask, client, extra_body={"adapter": name}) for name in ("styleA", "styleB", None)]
        with pytest.raises(openai.BadRequestError) as info:
            ask(client, extra_body={"adapter": "corrupt"})
        assert info.value.body["code"] == "adapter_invalid"
        assert all(isinstance(f.result(), str) for f in good)
    assert "Paris" in ask(client)


def test_closing_a_stream_frees_its_batch_slot(server):
    import time

    import httpx

    body = {"messages": QUESTION, "max_tokens": 400, "ignore_eos": True, "stream": True, "temperature": 0}
    with httpx.Client(base_url=server["url"], timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if '"content"' in line and '"content": ""' not in line:
                    break
            assert http.get("/ready").json()["running"] == 1
        deadline = time.monotonic() + 1.0
        while http.get("/ready").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert http.get("/ready").json()["running"] == 0
