"""On a CUDA device with an NF4 base, Triton kernels and CUDA graphs: a heterogeneous batch generates
what each request generates alone (``make gpu-check``; skipped without CUDA)."""

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

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = ["hello world", "the quick brown fox jumps over", "a", "lorem ipsum dolor sit amet, consectetur"]
ADAPTERS = [None, "attn-r4", "all-r8", "mlp-r2"]


@pytest.fixture
def cuda_engine(tiny_base_dir, adapter_store_dir):
    # fp32 compute: batch-size-dependent rounding (gemv for one row, dequantize + GEMM for several)
    # stays ~1e-6 on the logits, far from a greedy tie on a random model
    base = load_base_model(tiny_base_dir, "nf4", "cuda", dtype=torch.float32)
    lora = BatchedLoRAModel(base.model, torch.float32)
    assert lora.triton_ops is not None, "triton is not importable on this GPU machine"
    registry = AdapterRegistry(AdapterStore(adapter_store_dir), lora, max_loaded=4, max_rank=64)
    runner = ModelRunner(base.model, lora, base.device, cuda_graphs=True)
    assert runner.cuda_graphs is not None
    eng = LLMEngine(
        runner,
        registry,
        base.tokenizer,
        EngineConfig(max_running=16, max_prefills_per_step=4, context_length=512),
        eos_ids_for(base.tokenizer, base.model),
    )
    eng.start()
    yield eng, base.tokenizer
    eng.stop()


def generate(eng, tokenizer, items: list[tuple[str, str | None]]) -> list[str]:
    """Submits every ``(prompt, adapter)`` at once; returns each one's greedy text."""
    queues = []
    for i, (prompt, adapter) in enumerate(items):
        outputs: queue.Queue = queue.Queue()
        lease = eng.registry.lease(AdapterChoice(adapter))
        eng.submit(
            GenerationRequest(f"r{i}-{time.monotonic_ns()}", tokenizer(prompt)["input_ids"], GREEDY, lease),
            outputs.put,
        )
        queues.append(outputs)
    texts = []
    for outputs in queues:
        text, deadline = "", time.monotonic() + 120
        while True:
            out = outputs.get(timeout=max(0.1, deadline - time.monotonic()))
            assert out.error is None, out.error
            text += out.text_delta
            if out.finished:
                break
        texts.append(text)
    return texts


def test_heterogeneous_batch_equals_each_request_alone_on_cuda_nf4(cuda_engine):
    eng, tokenizer = cuda_engine
    items = list(zip(PROMPTS, ADAPTERS))
    together = generate(eng, tokenizer, items)
    alone = [generate(eng, tokenizer, [item])[0] for item in items]
    assert together == alone
    assert not eng.runner.cuda_graphs.disabled, "a CUDA graph capture failed (see the log)"
    assert eng.runner.cuda_graphs.graphs, "no decode step ran from a CUDA graph"
