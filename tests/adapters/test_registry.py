"""Resident adapters: LRU eviction, pins in flight, capacity, and the batched LoRA math."""

from __future__ import annotations

import shutil

import pytest
import torch

from adapters.base_model import load_base_model
from adapters.batched_lora import BatchedLoRAModel
from adapters.errors import AdapterBusy, AdapterNotFound
from adapters.lease import AdapterChoice
from adapters.registry import AdapterInUse, AdapterRegistry
from adapters.store import AdapterStore


@pytest.fixture
def registry(tiny_base_dir, adapter_store_dir):
    base = load_base_model(tiny_base_dir, "none", "cpu")
    lora = BatchedLoRAModel(base.model, torch.float32)
    return AdapterRegistry(AdapterStore(adapter_store_dir), lora, max_loaded=2, max_rank=64), base


def test_lru_evicts_the_least_recently_used_idle_adapter(registry):
    reg, _ = registry
    reg.load("attn-r4")
    reg.load("all-r8")
    reg.load("attn-r4")  # touch: all-r8 is now the oldest
    reg.load("mlp-r2")
    assert {r.name for r in reg.resident()} == {"attn-r4", "mlp-r2"}
    assert reg.stats.evictions == 1


def test_pinned_adapters_are_never_evicted_or_unloaded(registry):
    reg, _ = registry
    lease = reg.lease(AdapterChoice("attn-r4"))
    reg.lease(AdapterChoice("all-r8"))
    with pytest.raises(AdapterBusy):
        reg.load("mlp-r2")
    with pytest.raises(AdapterInUse):
        reg.unload("attn-r4")
    lease.release()
    reg.load("mlp-r2")  # attn-r4 is idle now and gets evicted
    assert {r.name for r in reg.resident()} == {"all-r8", "mlp-r2"}


def test_unknown_adapter(registry):
    reg, _ = registry
    with pytest.raises(AdapterNotFound):
        reg.lease(AdapterChoice("missing"))


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param([None, "attn-r4", "all-r8"], id="gather"),  # 2 adapters in 3 rows
        pytest.param(["attn-r4", None, "attn-r4", "all-r8", None, None, "all-r8", None], id="stacked"),
        pytest.param(["all-r8", "all-r8"], id="single"),
    ],
)
def test_batched_rows_match_peft_per_adapter(registry, tiny_base_dir, tiny_adapter_sources, layout, request):
    """One forward over rows with mixed adapters equals PEFT run for each adapter alone, in every
    mode of the batched LoRA layer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reg, base = registry
    slots = [reg.lease(AdapterChoice(name)).slot for name in layout]
    input_ids = torch.randint(3, 200, (len(layout), 7))
    with torch.no_grad(), reg.lora.rows(slots):
        assert reg.lora.state.mode == request.node.callspec.id
        batched = base.model(input_ids=input_ids).logits  # (B, 7, V)
    references = {}
    for name in set(layout):
        reference = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
        references[name] = (
            PeftModel.from_pretrained(reference, tiny_adapter_sources[name]) if name else reference
        )
    for row, name in enumerate(layout):
        with torch.no_grad():
            expected = references[name](input_ids=input_ids[row : row + 1]).logits[0]
        torch.testing.assert_close(batched[row], expected, rtol=1e-4, atol=1e-4)


def _kernel_off(model):
    from adapters.batched_lora import BatchedLoRALinear

    layers = [m for m in model.modules() if isinstance(m, BatchedLoRALinear)]
    kernels = [m.kernel for m in layers]
    for m in layers:
        m.kernel = None
    return lambda: [setattr(m, "kernel", k) for m, k in zip(layers, kernels)]


def test_compiled_kernel_equals_the_pytorch_modes(registry, tiny_base_dir, tiny_adapter_sources):
    """Decode rows (one token each, mixed adapters and the base) and packed prompts (token ranges)
    give the same logits through the compiled CPU kernel as through the plain PyTorch modes, and
    one-token rows match PEFT per adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reg, base = registry
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the kernel is optional and the PyTorch modes serve")
    assert reg.lora.kernel is not None, "a C++ compiler is installed but the CPU kernel did not build"
    names = [None, "attn-r4", "all-r8", "attn-r4", None, "all-r8"]
    slots = [reg.lease(AdapterChoice(n)).slot for n in names]
    ids = torch.randint(3, 200, (len(names), 1))
    packed = torch.randint(3, 200, (1, 12))
    ranges = [(slots[1], 0, 5), (0, 5, 7), (slots[2], 7, 12)]
    with torch.no_grad():
        with reg.lora.rows(slots):
            rows_kernel = base.model(input_ids=ids).logits
        with reg.lora.token_ranges(ranges):
            packed_kernel = base.model(input_ids=packed).logits
        restore = _kernel_off(base.model)
        with reg.lora.rows(slots):
            rows_torch = base.model(input_ids=ids).logits
        with reg.lora.token_ranges(ranges):
            packed_torch = base.model(input_ids=packed).logits
        restore()
    torch.testing.assert_close(rows_kernel, rows_torch, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed_kernel, packed_torch, rtol=1e-4, atol=1e-4)
    for row, name in enumerate(names):
        reference = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
        if name:
            reference = PeftModel.from_pretrained(reference, tiny_adapter_sources[name])
        with torch.no_grad():
            expected = reference(input_ids=ids[row : row + 1]).logits[0]
        torch.testing.assert_close(rows_kernel[row], expected, rtol=1e-4, atol=1e-4)
