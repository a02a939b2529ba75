"""The engine serves rsLoRA, DoRA, IA³, prompt- and prefix-tuning adapters as PEFT computes them, in one
batch."""

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

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
ADAPTERS = [
    None,
    "attn-r4",
    "rslora-patterns",
    "dora",
    "dora-rslora",
    "ia3",
    "prompt-tuning",
    "prefix-tuning",
    "prefix-projection",
]
PROMPTS = [
    "hello world",
    "the quick brown fox",
    "a",
    "lorem ipsum dolor sit",
    "x y z",
    "one more prompt here",
    "pt",
    "prefix me",
    "projected prefix",
]


@pytest.fixture
def engine(tiny_base_dir, peft_type_store_dir):
    base = load_base_model(tiny_base_dir, "none", "cpu", dtype=torch.float32)
    lora = BatchedLoRAModel(base.model, torch.float32)
    registry = AdapterRegistry(AdapterStore(peft_type_store_dir), lora, max_loaded=len(ADAPTERS), max_rank=64)
    eng = LLMEngine(
        ModelRunner(base.model, lora, base.device),
        registry,
        base.tokenizer,
        EngineConfig(max_running=16, max_prefills_per_step=8, context_length=512),
        eos_ids_for(base.tokenizer, base.model),
    )
    eng.start()
    yield eng, base.tokenizer
    eng.stop()


def _peft_logits(base_dir, source, token_ids: list[int]) -> torch.Tensor:
    """PEFT's teacher-forced logits ``(T, V)`` for ``token_ids`` with adapter ``source`` (None: base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if source is not None:
        model = PeftModel.from_pretrained(model, source)
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor([token_ids])).logits[0]
    return logits[-len(token_ids) :]  # prompt tuning: PEFT returns the virtual tokens' positions first


def test_prefill_and_decode_of_every_type_equal_peft_in_one_mixed_batch(
    engine, tiny_base_dir, tiny_adapter_sources, peft_type_sources
):
    """All prompts prefilled packed in one pass, then decoded together (teacher-forced), each with its own
    adapter type: every row's logits equal PEFT's ``PeftModel`` on that row alone."""
    eng, tok = engine
    sources = {**tiny_adapter_sources, **peft_type_sources}
    leases = [eng.registry.lease(AdapterChoice(a)) for a in ADAPTERS]
    slots = [lease.slot for lease in leases]
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    follow = tok(" and then")["input_ids"]
    runner = ModelRunner(eng.runner.model, eng.runner.lora, eng.runner.device)
    with eng.registry.lock:
        prefilled = runner.prefill(list(zip(prompts, slots)))
        steps = [runner.decode([t] * len(slots), slots) for t in follow]  # each (B, V)
    for row, (adapter, prompt) in enumerate(zip(ADAPTERS, prompts)):
        expected = _peft_logits(tiny_base_dir, sources[adapter] if adapter else None, prompt + follow)
        n = len(prompt)
        torch.testing.assert_close(prefilled[row][0], expected[n - 1], rtol=1e-4, atol=1e-4)
        for k, step in enumerate(steps):
            torch.testing.assert_close(step[row], expected[n + k], rtol=1e-4, atol=1e-4)
    for lease in leases:
        lease.release()


def _generate(eng, tok, rid: str, prompt: str, adapter: str | None) -> queue.Queue:
    outputs: queue.Queue = queue.Queue()
    lease = eng.registry.lease(AdapterChoice(adapter))  # released by the engine
    request = GenerationRequest(rid, tok(prompt)["input_ids"], GREEDY, lease)
    eng.submit(request, outputs.put)
    return outputs


def _text(outputs: queue.Queue, timeout: float = 60.0) -> str:
    text, deadline = "", time.monotonic() + timeout
    while True:
        out = outputs.get(timeout=max(0.1, deadline - time.monotonic()))
        text += out.text_delta
        if out.finished:
            return text


def test_a_mixed_batch_of_types_generates_what_each_request_generates_alone(engine):
    eng, tok = engine
    prompt = "the same prompt for all"
    solo = [_text(_generate(eng, tok, f"solo{i}", prompt, a)) for i, a in enumerate(ADAPTERS)]
    queues = [_generate(eng, tok, f"batch{i}", prompt, a) for i, a in enumerate(ADAPTERS)]
    assert [_text(q) for q in queues] == solo
    assert len(set(solo)) == len(solo)  # every adapter type really changes the output


@pytest.mark.parametrize("adapter", ["prefix-tuning", "prefix-projection"])
def test_served_greedy_prefix_tuning_equals_a_greedy_loop_over_peft_forward(
    engine, tiny_base_dir, peft_type_sources, adapter
):
    """PEFT 0.21's ``generate`` ignores a prefix-tuning adapter, so the reference is its forward over
    the whole sequence, one greedy token at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    eng, tok = engine
    prompt = "greedy with a prefix"
    served = _text(_generate(eng, tok, f"prefix-{adapter}", prompt, adapter))
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(model, peft_type_sources[adapter]).eval()
    ids = tok(prompt)["input_ids"]
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(GREEDY.max_tokens):
            logits = reference(input_ids=torch.tensor([ids + generated])).logits[0, -1]
            generated.append(int(logits.argmax()))
    assert served == tok.decode(generated)
    base = _text(_generate(eng, tok, f"base-{adapter}", prompt, None))
    assert served != base  # the prefix really changes what is generated


@pytest.mark.parametrize("adapter", ["prompt-tuning", "prefix-tuning"])
def test_the_context_budget_counts_the_adapters_virtual_tokens(engine, adapter):
    """A prompt that fits the window on the base does not fit once the adapter's virtual tokens
    (4 for prompt tuning, 3 for prefix tuning) take their positions before it."""
    from server.engine.types import ContextLengthExceeded

    eng, _ = engine
    window = eng.config.context_length
    prompt = list(range(3, 3 + window - GREEDY.max_tokens))  # exactly fills the window on the base
    eng.submit(
        GenerationRequest("fits", prompt, GREEDY, eng.registry.lease(AdapterChoice(None))), queue.Queue().put
    )
    lease = eng.registry.lease(AdapterChoice(adapter))
    virtual = eng.runner.lora.virtual_token_count(lease.slot)
    assert virtual in (3, 4)
    with pytest.raises(ContextLengthExceeded, match=f"of which {virtual} are the adapter's virtual tokens"):
        eng.submit(GenerationRequest("too-long", prompt, GREEDY, lease), queue.Queue().put)
    assert eng.registry.get(adapter).pins == 0  # the refused request's lease share was given back
