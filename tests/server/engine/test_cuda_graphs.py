"""The decode step's fixed-shape form (what a CUDA graph records) computes what the eager step does.

On the CPU the fixed-shape steps run eagerly (``capture=False``): padding rows, the column written
through a device index, attention over the full column capacity, the adapter layers' static mode.
The tests marked ``gpu`` record and replay real CUDA graphs (``make gpu-check``).
"""

from __future__ import annotations

import pytest
import torch

from adapters.base_model import load_base_model
from adapters.batched_lora import BatchedLoRAModel
from adapters.lora import load_lora_weights
from server.engine.cuda_graphs import BUCKETS, CudaGraphDecoder, bucket_for
from server.engine.runner import ModelRunner

# LoRA of mixed ranks, rsLoRA with patterns, DoRA (output scales), IA³ (input and output scales)
MIXED_ADAPTERS = ["attn-r4", "all-r8", "rslora-patterns", "dora", "ia3"]


@pytest.mark.parametrize(
    ("rows", "bucket"), [(1, 1), (2, 2), (3, 4), (5, 8), (17, 32), (512, 512), (513, None)]
)
def test_a_batch_runs_in_the_smallest_bucket_that_holds_it(rows, bucket):
    assert bucket_for(rows) == bucket
    assert list(BUCKETS) == sorted(BUCKETS)


def mixed_lora(base_dir, sources, device: str, dtype: torch.dtype, quantization: str = "none"):
    """A tiny base on ``device`` with :data:`MIXED_ADAPTERS` in slots 1….."""
    base = load_base_model(base_dir, quantization, device, dtype=dtype)
    lora = BatchedLoRAModel(base.model, dtype)
    lora.reserve_slots(len(MIXED_ADAPTERS) + 1)
    for slot, name in enumerate(MIXED_ADAPTERS, start=1):
        weights = load_lora_weights(name, sources[name], lora.linear_shapes, max_rank=64)
        lora.install(slot, weights)
    return base, lora


def decode_both(eager: ModelRunner, graphed: ModelRunner, atol: float) -> None:
    """Rows join and leave between steps (buckets 4, 8, 2, 1), every mix of adapter kinds, base rows:
    each step's logits agree, and the cache keeps no column open for rows past the batch."""
    prompts = [([3, 8, 1], 0), ([9, 4], 1), ([7], 2), ([5, 5, 6, 2], 3), ([11, 2], 4), ([6], 5)]
    batch: list[int] = []  # slot of each running row, the same in both runners
    plan = [(3, None), (6, None), (None, 1), (None, 0), (None, 0), (None, 0), (None, 0)]
    tokens: list[int] = []
    for join, leave in plan:
        if join is not None:
            for runner in (eager, graphed):
                runner.prefill(prompts[len(batch) : join])
            tokens += [1] * (join - len(batch))
            batch += [slot for _, slot in prompts[len(batch) : join]]
        if leave is not None:
            moved = [runner.remove_row(leave) for runner in (eager, graphed)]
            assert moved[0] == moved[1]
            if moved[0] is not None:  # the last row took the removed row's place
                batch[leave], tokens[leave] = batch[moved[0]], tokens[moved[0]]
            batch.pop(), tokens.pop()
        want = eager.decode(tokens, batch)
        got = graphed.decode(tokens, batch)
        assert got.shape == want.shape == (len(batch), want.shape[-1])
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=atol)
        kv = graphed.kv
        assert not kv.mask[kv.num_rows :].any()
        assert (kv.length, kv.num_rows) == (eager.kv.length, eager.kv.num_rows)
        tokens = want.argmax(-1).tolist()


@torch.inference_mode()
def test_fixed_shape_decode_steps_equal_the_eager_step(
    tiny_base_dir, tiny_adapter_sources, peft_type_sources
):
    base, lora = mixed_lora(
        tiny_base_dir, {**tiny_adapter_sources, **peft_type_sources}, "cpu", torch.float32
    )
    eager = ModelRunner(base.model, lora, base.device)
    graphed = ModelRunner(base.model, lora, base.device)
    graphed.cuda_graphs = CudaGraphDecoder(graphed.fast_decode, lora, graphed.kv, capture=False)
    decode_both(eager, graphed, atol=1e-4)
    assert set(graphed.cuda_graphs.steps) == {1, 2, 4, 8}


def test_cuda_graphs_are_never_set_up_on_the_cpu(tiny_base_dir):
    base = load_base_model(tiny_base_dir, "none", "cpu", dtype=torch.float32)
    runner = ModelRunner(
        base.model, BatchedLoRAModel(base.model, torch.float32), base.device, cuda_graphs=True
    )
    assert runner.cuda_graphs is None


def test_layout_version_changes_only_with_what_a_graph_recorded(tiny_base_dir, tiny_adapter_sources):
    """Loading an adapter into an existing slot of a bank that already has LoRA keeps the version (the
    graph reads the new weights in place); a bank that grows or gains a kind of step changes it."""
    base = load_base_model(tiny_base_dir, "none", "cpu", dtype=torch.float32)
    lora = BatchedLoRAModel(base.model, torch.float32)
    lora.reserve_slots(3)
    load = {
        name: load_lora_weights(name, tiny_adapter_sources[name], lora.linear_shapes, max_rank=64)
        for name in ("all-r8", "attn-r4")
    }
    version = lora.layout_version
    lora.install(1, load["all-r8"])  # every bank gains LoRA and rank 8
    assert lora.layout_version > version
    version = lora.layout_version
    lora.install(2, load["attn-r4"])  # rank 4 fits; slots exist; q/v already have LoRA
    lora.clear(2)
    assert lora.layout_version == version
    lora.clear(1)  # no bank holds LoRA any more: a graph would skip work it now must not do
    assert lora.layout_version > version


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@torch.inference_mode()
def test_cuda_graph_replay_equals_the_eager_step(
    tiny_base_dir, tiny_adapter_sources, peft_type_sources, dtype
):
    base, lora = mixed_lora(tiny_base_dir, {**tiny_adapter_sources, **peft_type_sources}, "cuda", dtype)
    eager = ModelRunner(base.model, lora, base.device)
    graphed = ModelRunner(base.model, lora, base.device, cuda_graphs=True)
    assert graphed.cuda_graphs is not None and graphed.cuda_graphs.capture
    decode_both(eager, graphed, atol=1e-4 if dtype == torch.float32 else 5e-2)
    assert not graphed.cuda_graphs.disabled, "a capture failed (see the log)"
    assert set(graphed.cuda_graphs.graphs) == {1, 2, 4, 8}
