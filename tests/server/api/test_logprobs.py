"""Logprobs, echo, logit_bias and token-id prompts, checked against direct forwards of the tiny model."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from tests.server.conftest import shared_client

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def lp_client(tiny_base_dir, tiny_adapter_sources, tmp_path_factory):
    with shared_client(
        tmp_path_factory,
        tiny_base_dir,
        tiny_adapter_sources,
        "logprobs",
        max_loaded_adapters=4,
        dtype="float32",
        # compared with a direct forward at 1e-5: a prompt start taken from the prefix cache is
        # attended in another order (equal greedy outputs are tested in test_prefix_cache.py)
        prefix_cache_bytes=0,
    ) as client:
        yield client


def forward_logprobs(client, ids: list[int], adapter: str | None) -> torch.Tensor:
    """log_softmax of the model's logits at every position of ``ids``, with ``adapter`` on every row."""
    state = client.app.state.serving
    slot = state.registry.get(adapter).slot if adapter else 0
    with state.registry.lock.shared(), torch.inference_mode(), state.registry.lora.rows([slot]):
        logits = state.base.model(input_ids=torch.tensor([ids])).logits[0]  # (T, V)
    return torch.log_softmax(logits.float(), dim=-1)


def completion(client, **body) -> dict:
    r = client.post("/v1/completions", json={"prompt": PROMPT, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def prompt_ids(client, text: str = PROMPT) -> list[int]:
    return client.app.state.serving.base.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("adapter", [None, "attn-r4", "all-r8"])
def test_completion_logprobs_equal_log_softmax_of_a_direct_forward(lp_client, adapter):
    body = completion(lp_client, max_tokens=6, logprobs=3, adapter=adapter, ignore_eos=True)
    lp = body["choices"][0]["logprobs"]
    ids = prompt_ids(lp_client)
    # greedy: rebuild the generated ids by teacher forcing, each the argmax of a direct forward
    for k in range(6):
        row = forward_logprobs(lp_client, ids, adapter)[-1]
        best = torch.topk(row, 3)
        assert lp["token_logprobs"][k] == pytest.approx(float(best.values[0]), rel=1e-5, abs=1e-5)
        # keyed by token text, as OpenAI's format is: byte tokens decoding alike share one key
        for value in lp["top_logprobs"][k].values():
            assert any(value == pytest.approx(ref, rel=1e-5, abs=1e-5) for ref in best.values.tolist())
        ids.append(int(best.indices[0]))
    tokenizer = lp_client.app.state.serving.base.tokenizer
    assert tokenizer.decode(ids[-6:]) == body["choices"][0]["text"]
    assert len(lp["tokens"]) == len(lp["text_offset"]) == 6


def test_echo_returns_the_prompt_with_teacher_forced_logprobs(lp_client):
    ids = prompt_ids(lp_client)
    for max_tokens in (0, 2):
        body = completion(lp_client, max_tokens=max_tokens, logprobs=1, echo=True)
        choice = body["choices"][0]
        assert choice["text"].startswith(PROMPT)
        lp = choice["logprobs"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        reference = forward_logprobs(lp_client, ids, None)
        for t in range(1, len(ids)):
            assert lp["token_logprobs"][t] == pytest.approx(float(reference[t - 1, ids[t]]), abs=1e-5)
        assert len(lp["tokens"]) == len(ids) + max_tokens
        assert "".join(lp["tokens"][: len(ids)]) == PROMPT
        assert lp["text_offset"][:2] == [0, len(lp["tokens"][0])]
        if max_tokens == 0:
            assert choice["text"] == PROMPT and body["usage"]["completion_tokens"] == 0


def test_chat_logprobs_inside_a_mixed_batch_equal_each_alone(lp_client):
    base = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0}
    variants = [
        {**base, "logprobs": True, "top_logprobs": 2},
        {**base, "adapter": "attn-r4", "logprobs": True, "top_logprobs": 2},
        {**base, "adapter": "mlp-r2"},
        {**base, "adapter": "all-r8", "logprobs": True},
    ]
    solo = [lp_client.post("/v1/chat/completions", json=v).json() for v in variants]
    together: list[dict | None] = [None] * len(variants)

    def run(i: int) -> None:
        together[i] = lp_client.post("/v1/chat/completions", json=variants[i]).json()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(variants))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for alone, batched in zip(solo, together):
        a, b = alone["choices"][0], batched["choices"][0]
        assert a["message"] == b["message"]
        if a["logprobs"] is None:
            assert b["logprobs"] is None
            continue
        for x, y in zip(a["logprobs"]["content"], b["logprobs"]["content"], strict=True):
            assert x["token"] == y["token"] and x["logprob"] == pytest.approx(y["logprob"], abs=1e-4)
            assert len(x["top_logprobs"]) == len(y["top_logprobs"])
    content = solo[0]["choices"][0]["logprobs"]["content"]
    assert len(content) == 6 and all(len(c["top_logprobs"]) == 2 for c in content)
    joined = b"".join(bytes(c["bytes"]) for c in content).decode("utf-8", errors="replace")
    assert joined == solo[0]["choices"][0]["message"]["content"]


def test_streamed_logprobs_equal_the_whole_response(lp_client):
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 2, "ignore_eos": True}
    whole = lp_client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    r = lp_client.post("/v1/completions", json={**body, "stream": True})
    tokens, token_logprobs = [], []
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            choice = json.loads(line[6:])["choices"]
            if choice and choice[0]["logprobs"]:
                tokens += choice[0]["logprobs"]["tokens"]
                token_logprobs += choice[0]["logprobs"]["token_logprobs"]
    assert tokens == whole["tokens"]
    assert token_logprobs == pytest.approx(whole["token_logprobs"], abs=1e-6)


def test_logit_bias_bans_and_forces_tokens(lp_client):
    first = completion(lp_client, max_tokens=1, logprobs=0)["choices"][0]["logprobs"]["tokens"][0]
    token = lp_client.app.state.serving.base.tokenizer(first, add_special_tokens=False)["input_ids"][0]
    banned = completion(lp_client, max_tokens=1, logit_bias={str(token): -100})["choices"][0]["text"]
    assert banned != first
    forced_id = token + 1 if token + 1 < 200 else token - 1
    forced = completion(lp_client, max_tokens=3, logit_bias={str(forced_id): 100}, ignore_eos=True)
    expected = lp_client.app.state.serving.base.tokenizer.decode([forced_id] * 3)
    assert forced["choices"][0]["text"] == expected


def test_token_id_prompts_single_and_batched(lp_client):
    ids = prompt_ids(lp_client)
    as_text = completion(lp_client, max_tokens=4)["choices"][0]["text"]
    assert completion(lp_client, prompt=ids, max_tokens=4)["choices"][0]["text"] == as_text
    batched = completion(lp_client, prompt=[ids, ids[:3]], max_tokens=4)
    assert len(batched["choices"]) == 2 and batched["choices"][0]["text"] == as_text
    r = lp_client.post("/v1/completions", json={"prompt": [ids, [10**6]], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[1]"
    r = lp_client.post("/v1/completions", json={"prompt": [-1], "max_tokens": 1})
    assert r.status_code == 400
