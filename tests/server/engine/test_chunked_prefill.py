"""Chunked prefill: a prompt prefilled over several passes gives the logits, keys and values, and
greedy output of the same prompt prefilled at once, whatever its adapter, cache hit or batch."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.base_model import load_base_model
from adapters.batched_lora import BatchedLoRAModel
from adapters.lease import AdapterChoice
from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from server.engine.engine import EngineConfig, LLMEngine, eos_ids_for
from server.engine.prefix_cache import PrefixCache
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler, Sequence
from server.engine.types import GenerationRequest, SamplingParams

# every kind of start a chunk can have: none, LoRA on q/k/v/o and MLP, LoRA on attention only,
# a prefix-tuning prefix, prompt-tuning virtual tokens
ADAPTERS = [None, "all-r8", "attn-r4", "prefix-tuning", "prompt-tuning"]


def _prompt(tok, n: int) -> list[int]:
    ids = tok("The river ran past the mill, and the miller counted every sack of grain twice. " * 8)[
        "input_ids"
    ]
    return ids[:n]


def _chunked(runner: ModelRunner, prompt: list[int], slot: int, limits: list[int], salt=None):
    """Prefills ``prompt`` in chunks of the given sizes (the last takes the rest); its final result."""
    earlier = None
    for limit in [*limits, None]:
        [earlier] = runner.prefill_forward([(prompt, slot)], cache_salts=[salt], chunks=[(earlier, limit)])
        if earlier.prompt_tokens == len(prompt):
            return earlier
    raise AssertionError("the prompt never finished")


def _assert_same_prefill(got, want) -> None:
    """Within 1e-4 in fp32: chunks change the matmuls' row counts, so their summation order."""
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    assert len(got.layers) == len(want.layers)
    for (gk, gv), (wk, wv) in zip(got.layers, want.layers):
        assert gk.shape == wk.shape
        torch.testing.assert_close(gk, wk, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gv, wv, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_chunks_give_the_logits_keys_and_values_of_one_pass_then_decode_the_same(served, adapter):
    base, lora, registry = served
    lease = registry.lease(AdapterChoice(adapter))
    prompt = _prompt(base.tokenizer, 45)
    chunked_runner = ModelRunner(base.model, lora, base.device)
    whole_runner = ModelRunner(base.model, lora, base.device)
    with registry.lock:
        [whole] = whole_runner.prefill_forward([(prompt, lease.slot)])
        got = _chunked(chunked_runner, prompt, lease.slot, [7, 1, 16])
        assert got.prompt_tokens == whole.prompt_tokens == len(prompt)
        _assert_same_prefill(got, whole)
        chunked_runner.add_rows([got])
        whole_runner.add_rows([whole])
        for t in _prompt(base.tokenizer, 5):
            torch.testing.assert_close(
                chunked_runner.decode([t], [lease.slot]),
                whole_runner.decode([t], [lease.slot]),
                rtol=1e-5,
                atol=1e-5,
            )
    lease.release()


@settings(max_examples=25, deadline=None)
@given(
    length=st.integers(1, 40),
    limits=st.lists(st.integers(1, 20), max_size=6),
    adapter=st.sampled_from(ADAPTERS),
)
def test_any_chunking_of_any_prompt_equals_one_pass(served_once, length, limits, adapter):
    """Chunks of any sizes (1 token, longer than what is left) over prompts of any length."""
    base, lora, registry = served_once
    lease = registry.lease(AdapterChoice(adapter))
    prompt = _prompt(base.tokenizer, length)
    runner = ModelRunner(base.model, lora, base.device)
    with registry.lock:
        [whole] = runner.prefill_forward([(prompt, lease.slot)])
        _assert_same_prefill(_chunked(runner, prompt, lease.slot, limits), whole)
    lease.release()


@pytest.fixture(scope="module")
def served_once(tiny_base_dir, tmp_path_factory, tiny_adapter_sources, peft_type_sources):
    """``served`` for a hypothesis test (one model for every example)."""
    import shutil

    store = tmp_path_factory.mktemp("chunk-store")
    for name, src in {**tiny_adapter_sources, **peft_type_sources}.items():
        shutil.copytree(src, store / name)
    base = load_base_model(tiny_base_dir, "none", "cpu", dtype=torch.float32)
    lora = BatchedLoRAModel(base.model, torch.float32)
    return base, lora, AdapterRegistry(AdapterStore(store), lora, max_loaded=8, max_rank=64)


def test_a_chunked_prompt_starts_from_its_cache_hit_and_stores_its_chunks(served):
    """The first chunk starts after the prefix-cache hit (the limit counts computed tokens), every
    chunk's whole blocks are stored, and the result equals an uncached one-pass prefill."""
    base, lora, registry = served
    cache = PrefixCache(64 << 20)
    runner = ModelRunner(base.model, lora, base.device, prefix_cache=cache)
    plain = ModelRunner(base.model, lora, base.device)
    prompt = _prompt(base.tokenizer, 60)
    block = cache.block_tokens
    with registry.lock:
        runner.prefill_forward([(prompt[:20], 0)], cache_salts=[""])  # caches the first block
        [first] = runner.prefill_forward([(prompt, 0)], cache_salts=[""], chunks=[(None, 10)])
        assert first.cached_tokens == block and first.prompt_tokens == block + 10
        [rest] = runner.prefill_forward([(prompt, 0)], cache_salts=[""], chunks=[(first, None)])
        assert rest.cached_tokens == block  # reported once, for the whole prompt
        [whole] = plain.prefill_forward([(prompt, 0)])
        _assert_same_prefill(rest, whole)
        [again] = runner.prefill_forward([(prompt, 0)], cache_salts=[""])
        assert again.cached_tokens == (len(prompt) - 1) // block * block  # every chunk's blocks stored
        _assert_same_prefill(again, whole)


def test_a_prompt_that_asks_for_prompt_logprobs_is_never_split(served):
    base, lora, registry = served
    runner = ModelRunner(base.model, lora, base.device)
    with registry.lock, pytest.raises(ValueError, match="one chunk"):
        runner.prefill_forward([(_prompt(base.tokenizer, 30), 0)], [2], chunks=[(None, 8)])


# ---------------------------------------------------------------------------------------- scheduling
@dataclass
class _Lease:
    slot: int = 0
    released: bool = field(default=False)

    def release(self) -> None:
        self.released = True


def _seq(n: int, logprobs: int | None = None) -> Sequence:
    sampling = SamplingParams(max_tokens=1, prompt_logprobs=logprobs)
    return Sequence(
        GenerationRequest(f"r{n}-{id(sampling)}", list(range(n)), sampling, _Lease()), lambda _: None
    )


@settings(max_examples=100, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 3000), st.booleans()), min_size=1, max_size=12),
    budget=st.integers(1, 1024),
    room=st.integers(1, 8),
)
def test_a_pass_never_computes_more_than_its_budget_and_never_splits_scored_prompts(lengths, budget, room):
    scheduler = Scheduler(max_running=64, max_prefills_per_step=4)
    queued = [_seq(n, 0 if scored else None) for n, scored in lengths]
    for seq in queued:
        scheduler.add(seq)
    batch = scheduler.next_prefills(room, budget)
    assert 1 <= len(batch) <= min(room, 4)
    computed = [s.prompt_tokens_left() if s.chunk_limit is None else s.chunk_limit for s in batch]
    assert all(c >= 1 for c in computed)
    for seq in batch:
        if seq.request.sampling.prompt_logprobs is not None:
            assert seq.chunk_limit is None  # whole
        else:
            assert seq.chunk_limit is not None and seq.chunk_limit <= seq.prompt_tokens_left()
    assert sum(computed) <= budget or (len(batch) == 1 and batch[0].chunk_limit is None)
    assert batch == queued[: len(batch)]  # first come, first taken
    assert list(scheduler.waiting) == queued[len(batch) :]


# ---------------------------------------------------------------------------------------- the engine
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _engine(base, lora, registry, chunk: int | None, worker: bool, cache_bytes: int = 0) -> LLMEngine:
    eng = LLMEngine(
        ModelRunner(base.model, lora, base.device, prefix_cache=PrefixCache(cache_bytes)),
        registry,
        base.tokenizer,
        EngineConfig(
            max_running=16,
            max_prefills_per_step=4,
            context_length=512,
            prefill_worker=worker,
            prefill_chunk_tokens=chunk,
        ),
        eos_ids_for(base.tokenizer, base.model),
    )
    eng.start()
    return eng


def _submit_all(eng: LLMEngine, jobs: list[tuple[list[int], str | None]]) -> list[list[int]]:
    """Submits every job at once (so they share passes and the batch); each one's greedy token ids."""
    outputs: dict[int, queue.Queue] = {}
    for i, (ids, adapter) in enumerate(jobs):
        outputs[i] = queue.Queue()
        lease = eng.registry.lease(AdapterChoice(adapter))
        eng.submit(GenerationRequest(f"j{i}", ids, GREEDY, lease, ""), outputs[i].put)
    results = []
    deadline = time.monotonic() + 120
    for i in range(len(jobs)):
        token_ids = []
        while True:
            out = outputs[i].get(timeout=max(0.1, deadline - time.monotonic()))
            assert out.error is None, out.error
            token_ids += list(out.token_ids)
            if out.finished:
                results.append(token_ids)
                break
    return results


@pytest.mark.parametrize("worker", [False, True])
def test_greedy_outputs_with_chunked_prefill_equal_those_without(served, worker):
    """Long and short prompts over every adapter kind, submitted together: chunks of 7 tokens (each
    long prompt takes several passes, short ones join between them) give the same tokens."""
    base, lora, registry = served
    tok = base.tokenizer
    jobs = [(_prompt(tok, n), adapter) for n in (3, 40, 17) for adapter in ADAPTERS]
    whole = _engine(base, lora, registry, None, worker)
    expected = _submit_all(whole, jobs)
    whole.stop()
    chunked = _engine(base, lora, registry, 7, worker, cache_bytes=64 << 20)
    assert _submit_all(chunked, jobs) == expected
    assert chunked.stats.prefill_forwards > whole.stats.prefill_forwards
    chunked.stop()


def test_a_request_cancelled_between_chunks_ends_and_frees_its_state(served):
    base, lora, registry = served
    eng = _engine(base, lora, registry, 1, worker=False)
    outputs: queue.Queue = queue.Queue()
    lease = registry.lease(AdapterChoice("all-r8"))
    eng.submit(GenerationRequest("long", _prompt(base.tokenizer, 60), GREEDY, lease, ""), outputs.put)
    deadline = time.monotonic() + 30
    while eng.stats.prefill_forwards < 3 and time.monotonic() < deadline:  # some chunks done, not all
        time.sleep(0.001)
    assert 3 <= eng.stats.prefill_forwards < 60
    eng.cancel("long")
    out = outputs.get(timeout=30)
    while not out.finished:
        out = outputs.get(timeout=30)
    assert out.finish_reason == "cancelled"
    deadline = time.monotonic() + 10
    while eng.health().waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert eng.health().waiting == 0 and eng.health().running == 0
    eng.stop()
