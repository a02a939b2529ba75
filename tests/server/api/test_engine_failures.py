"""A failure inside the engine fails that request (503, or an SSE error event) and the rest carry on."""

from __future__ import annotations

import json
import logging

CHAT = {"max_tokens": 6, "temperature": 0}


def _poison(client, marker_token_count: int):
    """Makes prefill fail for prompts of one exact length, as an out-of-memory error would."""
    runner = client.app.state.serving.engine.runner
    original = runner.prefill_forward

    def failing_prefill(prompts, prompt_logprobs=None, cache_salts=None, chunks=None):
        if any(len(ids) == marker_token_count for ids, _ in prompts):
            raise MemoryError("simulated out of memory")
        return original(prompts, prompt_logprobs, cache_salts, chunks)

    runner.prefill_forward = failing_prefill


def test_a_failing_request_gets_503_and_the_engine_keeps_serving(client, caplog):
    poisoned = {"role": "user", "content": "p" * 40}
    tokenizer = client.app.state.serving.base.tokenizer
    text = tokenizer.apply_chat_template([poisoned], tokenize=False, add_generation_prompt=True)
    _poison(client, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    with caplog.at_level(logging.ERROR):
        failed = client.post(
            "/v1/chat/completions",
            json={**CHAT, "messages": [poisoned]},
            headers={"X-Request-ID": "req-oom-1"},
        )
    assert failed.status_code == 503
    assert failed.json()["error"]["code"] == "generation_failed"
    assert "MemoryError" in failed.json()["error"]["message"] and "Traceback" not in failed.text
    assert any("prefill failed" in r.getMessage() and "req-oom-1" in r.getMessage() for r in caplog.records)
    ok = client.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "fine"}]})
    assert ok.status_code == 200
    assert client.get("/ready").status_code == 200


def test_an_error_mid_stream_ends_with_an_error_event_then_done(client):
    runner = client.app.state.serving.engine.runner
    original, calls = runner.decode, {"n": 0}

    def failing_decode(last_token_ids, slots):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated device failure")
        return original(last_token_ids, slots)

    runner.decode = failing_decode
    body = {
        **CHAT,
        "max_tokens": 20,
        "ignore_eos": True,
        "stream": True,
        "messages": [{"role": "user", "content": "stream"}],
    }
    text = client.post("/v1/chat/completions", json=body).text
    assert "event: error" in text
    error_line = text.split("event: error\ndata: ", 1)[1].split("\n", 1)[0]
    assert json.loads(error_line)["error"]["code"] == "generation_failed"
    assert text.rstrip().endswith("data: [DONE]")
    runner.decode = original
    again = client.post(
        "/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "after"}]}
    )
    assert again.status_code == 200
