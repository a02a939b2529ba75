"""Faults in one row or one step: that request fails, the rest of the batch gives its solo output."""

from __future__ import annotations

import time

import pytest

from server.engine import engine as engine_module
from tests.server.engine.test_engine import ADAPTERS, PROMPTS, collect, make_engine, submit


@pytest.fixture(params=[False, True], ids=["one-thread", "prefill-worker"])
def engine(request, tiny_base_dir, adapter_store_dir):
    eng, tokenizer = make_engine(tiny_base_dir, adapter_store_dir, prefill_worker=request.param)
    yield eng, tokenizer
    eng.stop()


def solo_outputs(eng, tok) -> list[str]:
    return [collect(submit(eng, tok, f"solo{i}", p, a))[1] for i, (p, a) in enumerate(zip(PROMPTS, ADAPTERS))]


def final(outputs) -> tuple[str, object]:
    """(text, the finished output) of one request."""
    text = ""
    while True:
        out = outputs.get(timeout=60)
        text += out.text_delta
        if out.finished:
            return text, out


def test_a_row_with_non_finite_logits_fails_alone(engine):
    eng, tok = engine
    solo = solo_outputs(eng, tok)
    poisoned_slot = eng.registry.get("all-r8").slot
    original, steps = eng.runner.decode, {"n": 0}

    def decode_with_a_nan_row(last_tokens, slots):
        logits = original(last_tokens, slots)
        steps["n"] += 1
        if steps["n"] >= 3:  # mid-generation, as an overflowing adapter would
            for row, slot in enumerate(slots):
                if slot == poisoned_slot:
                    logits[row, 7] = float("nan")
        return logits

    eng.runner.decode = decode_with_a_nan_row
    queues = [submit(eng, tok, f"b{i}", p, a) for i, (p, a) in enumerate(zip(PROMPTS, ADAPTERS))]
    results = [final(q) for q in queues]
    for i, (text, out) in enumerate(results):
        if ADAPTERS[i] == "all-r8":
            assert out.finish_reason == "error" and out.error.code == "non_finite_logits"
            assert "all-r8" in str(out.error)
        else:
            assert out.finish_reason == "length" and text == solo[i], f"row {i} was disturbed"
    assert eng.health().alive and all(eng.registry.get(a).pins == 0 for a in ADAPTERS[1:])


def test_an_exception_handling_one_rows_token_fails_that_row_alone(engine):
    eng, tok = engine
    solo = solo_outputs(eng, tok)
    original = eng._on_token

    def on_token(seq, token):
        if seq.request_id == "b2" and len(seq.output_ids) == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "simulated detokenizer failure")
        return original(seq, token)

    eng._on_token = on_token
    queues = [submit(eng, tok, f"b{i}", p, a) for i, (p, a) in enumerate(zip(PROMPTS, ADAPTERS))]
    results = [final(q) for q in queues]
    for i, (text, out) in enumerate(results):
        if i == 2:
            assert out.finish_reason == "error" and "UnicodeDecodeError" in str(out.error)
        else:
            assert out.finish_reason == "length" and text == solo[i]
    assert eng.health().alive


def test_a_failing_step_fails_its_rows_and_the_engine_goes_on(engine, monkeypatch):
    eng, tok = engine
    solo = solo_outputs(eng, tok)
    original, calls = eng.runner.decode, {"n": 0}

    def failing_once(last_tokens, slots):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated device fault")
        return original(last_tokens, slots)

    eng.runner.decode = failing_once
    queues = [submit(eng, tok, f"f{i}", p, a) for i, (p, a) in enumerate(zip(PROMPTS, ADAPTERS))]
    failed = [final(q)[1] for q in queues]
    assert all(out.finish_reason in ("error", "length") for out in failed)
    assert any(out.finish_reason == "error" for out in failed)
    # the batch was rebuilt: every new request gives its solo output, leases all returned
    assert solo_outputs(eng, tok) == solo
    assert eng.health().alive and all(eng.registry.get(a).pins == 0 for a in ADAPTERS[1:])


def test_only_repeated_failures_with_no_progress_are_fatal(engine, monkeypatch):
    eng, tok = engine
    monkeypatch.setattr(engine_module, "MAX_FAILED_STEPS", 2)

    def always_fails(last_tokens, slots):
        raise RuntimeError("the device is gone")

    eng.runner.decode = always_fails
    first = final(submit(eng, tok, "x0", PROMPTS[0], None))[1]
    assert first.finish_reason == "error"
    assert eng.health().alive  # one failed step is survived
    second = final(submit(eng, tok, "x1", PROMPTS[1], None))[1]
    assert second.finish_reason == "error"
    deadline = time.monotonic() + 10  # the loop marks itself dead right after failing the row
    while eng.health().alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not eng.health().alive  # now /ready reports it, before on_fatal exits the process
