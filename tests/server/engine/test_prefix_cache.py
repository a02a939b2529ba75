"""The LoRA-aware prefix cache: a prompt's cached start gives the logits and keys/values it would have
computed, only under the same adapter (and its current weights) and the same tenant."""

from __future__ import annotations

import queue
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.lease import AdapterChoice
from server.engine.engine import EngineConfig, LLMEngine, eos_ids_for
from server.engine.prefix_cache import PrefixCache
from server.engine.runner import ModelRunner
from server.engine.types import GenerationRequest, SamplingParams

B = 4  # small blocks, so short test prompts span several


def _layers(tokens: list[int], num_layers: int = 2, fill: float | None = None):
    """Per-layer ``(1, KVH=1, T, D=2)`` keys/values whose entries encode (layer, position)."""
    t = len(tokens)
    out = []
    for layer in range(num_layers):
        base = torch.arange(t, dtype=torch.float32)[None, None, :, None].expand(1, 1, t, 2)
        k = base + 1000 * layer if fill is None else torch.full((1, 1, t, 2), fill)
        out.append((k.clone(), -k.clone()))
    return out


def test_a_hit_covers_whole_blocks_and_leaves_the_last_token_to_compute():
    cache = PrefixCache(1 << 20, block_tokens=B)
    root = PrefixCache.root(0, 0, "")
    tokens = list(range(12))  # exactly 3 blocks
    assert cache.insert(root, 0, tokens, _layers(tokens)) == 3
    hit = cache.lookup(root, tokens)
    assert hit is not None and hit.num_tokens == 8  # block 3 would leave nothing to compute
    torch.testing.assert_close(hit.keys, torch.stack([k[0, :, :8] for k, _ in _layers(tokens)]))
    longer = cache.lookup(root, tokens + [99])
    assert longer is not None and longer.num_tokens == 12
    assert cache.lookup(root, [0, 1, 2]) is None  # shorter than a block


@pytest.mark.parametrize(
    ("slot", "generation", "salt", "tokens"),
    [
        (1, 0, "", list(range(9))),  # another adapter
        (0, 1, "", list(range(9))),  # the same slot after its adapter was replaced
        (0, 0, "tenant-b", list(range(9))),  # another tenant
        (0, 0, "", [0, 1, 2, 7, 4, 5, 6, 7, 8]),  # a token of the first block differs
    ],
)
def test_no_hit_across_model_identity_tenant_or_tokens(slot, generation, salt, tokens):
    cache = PrefixCache(1 << 20, block_tokens=B)
    original = list(range(9))
    cache.insert(PrefixCache.root(0, 0, ""), 0, original, _layers(original))
    assert cache.lookup(PrefixCache.root(slot, generation, salt), tokens) is None


class _CollidingCache(PrefixCache):
    """Every prompt's block ``i`` gets the key ``i``: as if all hashes collided."""

    def _chain(self, root, tokens, num_blocks):
        return [(i - 1 if i else root, i, tuple(tokens[i * B : (i + 1) * B])) for i in range(num_blocks)]


def test_a_hash_collision_is_a_miss_not_a_wrong_answer():
    cache = _CollidingCache(1 << 20, block_tokens=B)
    root = PrefixCache.root(0, 0, "")
    cache.insert(root, 0, list(range(9)), _layers(list(range(9))))
    assert cache.lookup(root, list(range(9))) is not None
    assert cache.lookup(root, [5] * 9) is None


def test_lru_within_the_budget_and_invalidation_by_slot():
    block_bytes = 2 * 2 * 1 * B * 2 * 4  # (2, L=2, KVH=1, B, D=2) float32
    cache = PrefixCache(3 * block_bytes, block_tokens=B)
    a, b = list(range(9)), list(range(100, 109))
    ra, rb = PrefixCache.root(0, 0, ""), PrefixCache.root(1, 0, "")
    cache.insert(ra, 0, a, _layers(a))  # 2 blocks
    cache.insert(rb, 1, b, _layers(b))  # 2 more: one of a's goes (its leaf first)
    assert cache.num_bytes <= cache.budget_bytes and len(cache) == 3
    hit = cache.lookup(ra, a)
    assert hit is not None and hit.num_tokens == B  # a's first block survived, its second was evicted
    assert cache.invalidate_slot(1) == 2
    assert cache.lookup(rb, b) is None and len(cache) == 1


def test_a_zero_budget_disables_the_cache():
    cache = PrefixCache(0, block_tokens=B)
    root = PrefixCache.root(0, 0, "")
    assert cache.insert(root, 0, list(range(9)), _layers(list(range(9)))) == 0
    assert cache.lookup(root, list(range(9))) is None


@settings(max_examples=60, deadline=None)
@given(
    first=st.lists(st.integers(0, 5), min_size=1, max_size=30),
    second=st.lists(st.integers(0, 5), min_size=1, max_size=30),
)
def test_a_hit_is_always_the_longest_common_whole_block_start(first, second):
    cache = PrefixCache(1 << 20, block_tokens=B)
    root = PrefixCache.root(0, 0, "")
    cache.insert(root, 0, first, _layers(first))
    common = 0
    while common < min(len(first), len(second)) and first[common] == second[common]:
        common += 1
    expected = min(common // B, len(first) // B, (len(second) - 1) // B) * B
    hit = cache.lookup(root, second)
    assert (0 if hit is None else hit.num_tokens) == expected
    if hit is not None:  # the keys are the first prompt's, position by position
        torch.testing.assert_close(hit.keys[0, 0, :, 0], torch.arange(expected, dtype=torch.float32))


# ---------------------------------------------------------------------------------------- the runner
ADAPTERS = [None, "all-r8", "attn-r4", "prefix-tuning"]


def _runner(base, lora, cache: PrefixCache | None) -> ModelRunner:
    return ModelRunner(base.model, lora, base.device, prefix_cache=cache)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_cached_start_gives_the_logits_and_decode_of_a_full_prefill(served, adapter):
    """Within 1e-4 in fp32 (the README's bound): the cached start's attention is two flash passes
    merged, not one, so its sums run in another order."""
    base, lora, registry = served
    lease = registry.lease(AdapterChoice(adapter))
    tok = base.tokenizer
    context = tok("You are a helpful assistant. Context: the moon is made of cheese. " * 2)["input_ids"]
    first, second = context + tok("Q: what?")["input_ids"], context + tok("Q: why is it so?")["input_ids"]
    follow = tok(" because")["input_ids"]
    cached = _runner(base, lora, PrefixCache(64 << 20))
    plain = _runner(base, lora, None)
    with registry.lock:
        cached.prefill_forward([(first, lease.slot)], cache_salts=[""])
        [hit] = cached.prefill_forward([(second, lease.slot)], cache_salts=[""])
        [full] = plain.prefill_forward([(second, lease.slot)])
        assert hit.cached_tokens >= len(context) - 16 and full.cached_tokens == 0
        torch.testing.assert_close(hit.logits, full.logits, rtol=1e-4, atol=1e-4)
        for (hk, hv), (fk, fv) in zip(hit.layers, full.layers):  # the row's whole KV, prefix included
            torch.testing.assert_close(hk, fk, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(hv, fv, rtol=1e-4, atol=1e-4)
        cached.add_rows([hit])
        plain.add_rows([full])
        for t in follow:  # the cached row decodes as the fully prefilled one
            torch.testing.assert_close(
                cached.decode([t], [lease.slot]), plain.decode([t], [lease.slot]), rtol=1e-4, atol=1e-4
            )
    lease.release()


def test_a_reloaded_adapter_never_sees_its_old_keys_and_values(served):
    base, lora, registry = served
    cache = PrefixCache(64 << 20)
    runner = _runner(base, lora, cache)
    prompt = base.tokenizer("a shared system prompt that is long enough " * 2)["input_ids"]
    lease = registry.lease(AdapterChoice("all-r8"))
    slot = lease.slot
    with registry.lock:
        runner.prefill_forward([(prompt, slot)], cache_salts=[""])
        assert len(cache) > 0
    lease.release()
    registry.unload("all-r8")  # the slot's blocks go with it
    assert len(cache) == 0
    lease = registry.lease(AdapterChoice("attn-r4"))  # may take the same slot
    with registry.lock:
        [again] = runner.prefill_forward([(prompt, lease.slot)], cache_salts=[""])
    assert again.cached_tokens == 0
    lease.release()


def test_prompt_logprobs_and_unsalted_prompts_bypass_the_lookup(served):
    base, lora, registry = served
    cache = PrefixCache(64 << 20)
    runner = _runner(base, lora, cache)
    prompt = base.tokenizer("the same words again and again and again " * 2)["input_ids"]
    with registry.lock:
        runner.prefill_forward([(prompt, 0)], cache_salts=[""])
        [scored] = runner.prefill_forward([(prompt, 0)], [0], cache_salts=[""])
        [unsalted] = runner.prefill_forward([(prompt, 0)], cache_salts=[None])
    assert scored.cached_tokens == 0 and len(scored.prompt_logprobs) == len(prompt) - 1
    assert unsalted.cached_tokens == 0


# ---------------------------------------------------------------------------------------- the engine
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _engine(base, lora, registry, cache_bytes: int) -> LLMEngine:
    eng = LLMEngine(
        _runner(base, lora, PrefixCache(cache_bytes)),
        registry,
        base.tokenizer,
        EngineConfig(max_running=16, max_prefills_per_step=4, context_length=512),
        eos_ids_for(base.tokenizer, base.model),
    )
    eng.start()
    return eng


def _generate(eng: LLMEngine, ids: list[int], adapter: str | None, salt: str, rid: str):
    """One request to the end: its text and generated token ids."""
    outputs: queue.Queue = queue.Queue()
    lease = eng.registry.lease(AdapterChoice(adapter))
    eng.submit(GenerationRequest(rid, ids, GREEDY, lease, salt), outputs.put)
    text, token_ids, deadline = "", [], time.monotonic() + 60
    while True:
        out = outputs.get(timeout=max(0.1, deadline - time.monotonic()))
        text, token_ids = text + out.text_delta, token_ids + list(out.token_ids)
        if out.finished:
            return text, token_ids


def _run_all(eng: LLMEngine, tok, jobs: list[tuple[str, str | None, str]]) -> list[str]:
    """Runs ``(prompt, adapter, salt)`` jobs one after another (so later ones can hit); their texts."""
    return [
        _generate(eng, tok(prompt)["input_ids"], adapter, salt, f"r{i}")[0]
        for i, (prompt, adapter, salt) in enumerate(jobs)
    ]


def test_greedy_outputs_with_the_cache_equal_those_without(served):
    base, lora, registry = served
    system = "System: answer briefly and truthfully, using the context given. " * 2
    jobs = [
        (system + q, adapter, salt)
        for q in ("Q: one", "Q: two?", "Q: three!!")
        for adapter in ADAPTERS
        for salt in ("", "tenant-b")
    ]
    without = _engine(base, lora, registry, 0)
    expected = _run_all(without, base.tokenizer, jobs)
    without.stop()
    with_cache = _engine(base, lora, registry, 64 << 20)
    assert _run_all(with_cache, base.tokenizer, jobs) == expected
    assert with_cache.stats.cached_prompt_tokens > 0
    with_cache.stop()


@pytest.mark.parametrize("adapter", [None, "prefix-tuning"])
def test_the_next_turn_reuses_the_previous_prompt_and_its_answer(served, adapter):
    base, lora, registry = served
    eng = _engine(base, lora, registry, 64 << 20)
    tok = base.tokenizer
    first = tok("User: tell me a story about a cat and a dog.\nAssistant:")["input_ids"]
    _, answer = _generate(eng, first, adapter, "", "turn-1")
    before = eng.stats.cached_prompt_tokens
    second = first + answer + tok("\nUser: and then?\nAssistant:")["input_ids"]
    _generate(eng, second, adapter, "", "turn-2")
    fed = len(first) + len(answer) - 1  # the last answer token was never fed back
    block = eng.runner.prefix_cache.block_tokens
    assert eng.stats.cached_prompt_tokens - before == fed // block * block
    eng.stop()
