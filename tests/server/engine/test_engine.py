"""The engine: heterogeneous batches equal solo runs, requests join mid-flight, cancel frees rows."""

from __future__ import annotations

import queue
import time

import pytest
import torch

from adapters.base_model import load_base_model
from adapters.batched_lora import BatchedLoRAModel
from adapters.lease import AdapterChoice
from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from server.engine.engine import EngineConfig, LLMEngine, eos_ids_for
from server.engine.runner import ModelRunner
from server.engine.types import GenerationRequest, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = ["hello world", "the quick brown fox jumps over", "a", "lorem ipsum dolor sit amet, consectetur"]
ADAPTERS = [None, "attn-r4", "all-r8", "mlp-r2"]


def make_engine(tiny_base_dir, adapter_store_dir, dtype=torch.float32, prefill_worker=False):
    base = load_base_model(tiny_base_dir, "none", "cpu", dtype=dtype)
    lora = BatchedLoRAModel(base.model, dtype)
    registry = AdapterRegistry(AdapterStore(adapter_store_dir), lora, max_loaded=4, max_rank=64)
    eng = LLMEngine(
        ModelRunner(base.model, lora, base.device),
        registry,
        base.tokenizer,
        EngineConfig(
            max_running=16, max_prefills_per_step=4, context_length=512, prefill_worker=prefill_worker
        ),
        eos_ids_for(base.tokenizer, base.model),
    )
    eng.start()
    return eng, base.tokenizer


@pytest.fixture
def engine(tiny_base_dir, adapter_store_dir):
    eng, tokenizer = make_engine(tiny_base_dir, adapter_store_dir)
    yield eng, tokenizer
    eng.stop()


@pytest.fixture
def engine_worker(tiny_base_dir, adapter_store_dir):
    """Prefill in the worker thread while the engine thread decodes (the CPU default)."""
    eng, tokenizer = make_engine(tiny_base_dir, adapter_store_dir, prefill_worker=True)
    yield eng, tokenizer
    eng.stop()


@pytest.fixture
def engine64(tiny_base_dir, adapter_store_dir):
    """float64: batch-size-dependent rounding (gemv vs gemm, padded attention) is ~1e-14, so no greedy
    near-tie can flip. In fp32 that rounding is ~1e-5 on the logits (bounded by
    test_batched_decode_logits_match_solo_in_fp32), so a random tiny model could in principle meet a tie."""
    eng, tokenizer = make_engine(tiny_base_dir, adapter_store_dir, torch.float64)
    yield eng, tokenizer
    eng.stop()


def submit(eng, tokenizer, rid, prompt, adapter, params=GREEDY) -> queue.Queue:
    outputs: queue.Queue = queue.Queue()
    lease = eng.registry.lease(AdapterChoice(adapter))  # the engine releases it when the request ends
    req = GenerationRequest(rid, tokenizer(prompt)["input_ids"], params, lease)
    eng.submit(req, outputs.put)
    return outputs


def collect(outputs: queue.Queue, timeout: float = 60.0) -> tuple[int, str, str]:
    """(completion tokens, text, finish reason) of one request."""
    text = ""
    deadline = time.monotonic() + timeout
    while True:
        out = outputs.get(timeout=max(0.1, deadline - time.monotonic()))
        text += out.text_delta
        if out.finished:
            return out.completion_tokens, text, out.finish_reason


@pytest.mark.parametrize("engine_fixture", ["engine", "engine64", "engine_worker"])
def test_heterogeneous_batch_equals_each_request_alone(engine_fixture, request):
    eng, tok = request.getfixturevalue(engine_fixture)
    solo = [collect(submit(eng, tok, f"solo{i}", p, a)) for i, (p, a) in enumerate(zip(PROMPTS, ADAPTERS))]
    queues = [submit(eng, tok, f"batch{i}", p, a) for i, (p, a) in enumerate(zip(PROMPTS, ADAPTERS))]
    batched = [collect(q) for q in queues]
    for i in range(len(PROMPTS)):
        assert batched[i][1] == solo[i][1], f"request {i} (adapter {ADAPTERS[i]}) differs when batched"
    assert len({s[1] for s in solo}) == len(solo)  # the adapters really change the outputs


@pytest.mark.parametrize("engine_fixture", ["engine", "engine_worker"])
def test_a_request_joins_a_running_batch_without_waiting_for_it(engine_fixture, request):
    eng, tok = request.getfixturevalue(engine_fixture)
    long_params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    long_q = submit(eng, tok, "long", "a long one", "all-r8", long_params)
    first = long_q.get(timeout=30)  # the long request is decoding
    assert not first.finished
    short = collect(submit(eng, tok, "short", "short", None, SamplingParams(max_tokens=3, temperature=0.0)))
    assert short[2] in ("length", "stop")
    assert eng.health().running == 1  # the short one finished while the long one still runs
    eng.cancel("long")
    assert collect(long_q)[2] == "cancelled"


@pytest.mark.parametrize("engine_fixture", ["engine", "engine_worker"])
def test_cancel_frees_the_batch_row(engine_fixture, request):
    eng, tok = request.getfixturevalue(engine_fixture)
    q = submit(
        eng,
        tok,
        "c",
        "cancel me",
        "attn-r4",
        SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True),
    )
    q.get(timeout=30)
    eng.cancel("c")
    assert collect(q)[2] == "cancelled"
    deadline = time.monotonic() + 5
    while eng.health().running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert eng.health().running == 0
    assert eng.registry.get("attn-r4").pins == 0  # the pin is released with the row


def test_worker_cancels_queued_requests_and_keeps_rows_consistent(engine_worker):
    """Many requests through the prefill worker, some cancelled while queued or being prefilled: each
    gets exactly one finish, the rest complete, and no row or pin is left behind."""
    eng, tok = engine_worker
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    queues = {f"w{i}": submit(eng, tok, f"w{i}", PROMPTS[i % 4], ADAPTERS[i % 4], params) for i in range(24)}
    for i in range(0, 24, 3):
        eng.cancel(f"w{i}")
    reasons = {rid: collect(q)[2] for rid, q in queues.items()}
    assert all(reasons[f"w{i}"] in ("cancelled", "length") for i in range(0, 24, 3))
    assert all(reasons[f"w{i}"] == "length" for i in range(24) if i % 3)
    for q in queues.values():
        assert q.empty()  # nothing after the finish
    deadline = time.monotonic() + 5
    while (eng.health().running or eng.health().waiting) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert eng.health().running == 0 and eng.health().waiting == 0
    assert all(eng.registry.get(a).pins == 0 for a in ADAPTERS[1:])


def test_a_dying_prefill_worker_fails_every_request_instead_of_hanging(engine_worker):
    eng, tok = engine_worker

    class WorkerKilled(BaseException):
        pass

    def dying(prompts, prompt_logprobs=None, cache_salts=None, chunks=None):
        raise WorkerKilled()

    eng.runner.prefill_forward = dying
    outputs = submit(eng, tok, "doomed", "hello", None)
    out = outputs.get(timeout=10)
    assert out.finished and out.finish_reason == "error"
    deadline = time.monotonic() + 5
    while eng.health().alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not eng.health().alive  # /ready turns unready; the server restarts it


def test_stop_strings_and_max_tokens(engine):
    eng, tok = engine
    count, text, reason = collect(
        submit(eng, tok, "free", "xyz", None, SamplingParams(max_tokens=12, temperature=0))
    )
    assert reason == "length" and count == 12
    stop = text[3:5]
    _, stopped, reason = collect(
        submit(eng, tok, "stop", "xyz", None, SamplingParams(max_tokens=12, temperature=0, stop=(stop,)))
    )
    assert reason == "stop"
    assert stopped == text[: text.find(stop)]


def test_seeded_sampling_repeats(engine):
    eng, tok = engine
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    first = collect(submit(eng, tok, "s1", "seed", "all-r8", params))
    second = collect(submit(eng, tok, "s2", "seed", "all-r8", params))
    assert first[1] == second[1]


def test_batched_decode_logits_match_solo_in_fp32(engine):
    """Teacher-forced: each row's logits in a mixed batch equal its logits alone (fp32 tolerance)."""
    eng, tok = engine
    registry = eng.registry
    slots = [0] + [registry.lease(AdapterChoice(a)).slot for a in ADAPTERS[1:]]
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    follow = tok("and then some more text")["input_ids"]

    def run(rows: list[int]) -> list[list[torch.Tensor]]:
        runner = ModelRunner(eng.runner.model, eng.runner.lora, eng.runner.device)
        with registry.lock:
            logits = [[runner.prefill([(prompts[r], slots[r])])[0][0]] for r in rows]
            for token in follow:
                step = runner.decode([token] * len(rows), [slots[r] for r in rows])
                for k in range(len(rows)):
                    logits[k].append(step[k])
        return logits

    batched = run(list(range(len(PROMPTS))))
    for r in range(len(PROMPTS)):
        for alone, together in zip(run([r])[0], batched[r]):
            torch.testing.assert_close(together, alone, rtol=0, atol=1e-4)


def test_packed_prefill_equals_each_prompt_alone(engine):
    """Prompts prefilled end to end in one forward pass (each with its adapter) give the logits and
    the KV rows each gets alone."""
    eng, tok = engine
    registry = eng.registry
    leases = [registry.lease(AdapterChoice(a)) for a in ADAPTERS[1:]]
    slots = [0] + [lease.slot for lease in leases]
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    with registry.lock:
        runner = ModelRunner(eng.runner.model, eng.runner.lora, eng.runner.device)
        packed = runner.prefill(list(zip(prompts, slots)))
        assert [row for _, row in packed] == list(range(len(PROMPTS)))
        for i, (prompt, slot) in enumerate(zip(prompts, slots)):
            alone = ModelRunner(eng.runner.model, eng.runner.lora, eng.runner.device)
            logits, _ = alone.prefill([(prompt, slot)])[0]
            torch.testing.assert_close(packed[i][0], logits, rtol=0, atol=1e-4)
            n = len(prompt)
            for layer in range(alone.kv.num_layers):  # both right-aligned at the cursor
                got = runner.kv.keys[layer][i, :, runner.kv.length - n : runner.kv.length]
                torch.testing.assert_close(got, alone.kv.keys[layer][0, :, :n], rtol=0, atol=1e-4)
    for lease in leases:
        lease.release()


def test_many_rows_and_long_outputs_grow_the_cache(engine64):
    """More rows than the initial KV allocation and more columns than its first size (buffers regrow)."""
    eng, tok = engine64
    params = SamplingParams(max_tokens=90, temperature=0.0, ignore_eos=True)
    queues = [
        submit(eng, tok, f"grow{i}", PROMPTS[i % 4] * (1 + i % 3), ADAPTERS[i % 4], params) for i in range(10)
    ]
    results = [collect(q) for q in queues]
    assert all(r[0] == 90 and r[2] == "length" for r in results)
    assert eng.health().alive
    again = collect(submit(eng, tok, "after", PROMPTS[1] * 2, ADAPTERS[1], params))
    assert again[1] == results[1][1]


def test_outputs_report_every_generated_token_once_and_the_stop_string(engine):
    eng, tok = engine
    free = submit(eng, tok, "ids", "xyz", None, SamplingParams(max_tokens=12, temperature=0))
    outputs = []
    while not outputs or not outputs[-1].finished:
        outputs.append(free.get(timeout=60))
    ids = [t for out in outputs for t in out.token_ids]
    text = "".join(out.text_delta for out in outputs)
    assert len(ids) == outputs[-1].completion_tokens == 12
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert outputs[-1].stop_sequence is None
    stop = text[3:5]
    stopped = submit(
        eng, tok, "ids-stop", "xyz", None, SamplingParams(max_tokens=12, temperature=0, stop=(stop,))
    )
    outputs = []
    while not outputs or not outputs[-1].finished:
        outputs.append(stopped.get(timeout=60))
    assert outputs[-1].finish_reason == "stop" and outputs[-1].stop_sequence == stop
    assert len([t for out in outputs for t in out.token_ids]) == outputs[-1].completion_tokens
