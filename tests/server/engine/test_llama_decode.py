"""The lean Llama decode step computes exactly what the model's own forward computes."""

from __future__ import annotations

import pytest
import torch

from adapters.batched_lora import BatchedLoRAModel
from adapters.int8_linear import ACTIVATION_BLOCK, quantize_model_int8
from adapters.lora import load_lora_weights
from server.engine.llama_decode import supports_fast_decode
from server.engine.runner import ModelRunner
from tests.tiny_models import make_tiny_llama, save_random_adapter, save_tiny_base


def _runners(model, adapter_dir=None):
    lora = BatchedLoRAModel(model, torch.float32)
    if adapter_dir is not None:
        lora.reserve_slots(2)
        lora.install(1, load_lora_weights("a", adapter_dir, lora.linear_shapes, max_rank=64))
    fast = ModelRunner(model, lora, torch.device("cpu"), fast_decode=True)
    plain = ModelRunner(model, lora, torch.device("cpu"), fast_decode=False)
    assert fast.fast_decode is not None and plain.fast_decode is None
    return fast, plain


@pytest.mark.parametrize("quantization", [None, "w8", "w8a8"])
@torch.inference_mode()
def test_fast_decode_equals_the_models_forward_with_mixed_adapter_rows(tmp_path, quantization):
    base_dir = save_tiny_base(tmp_path / "base")
    every_linear = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    adapter = save_random_adapter(base_dir, tmp_path / "a", target_modules=every_linear)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if quantization is not None:
        quantize_model_int8(model, ACTIVATION_BLOCK if quantization == "w8a8" else None)
    fast, plain = _runners(model, adapter)
    prompts = [([1, 2, 3, 4, 5], 0), ([7, 8], 1), ([9, 10, 11], 1)]
    for runner in (fast, plain):
        for prompt in prompts:
            runner.prefill([prompt])
    tokens = [3, 9, 4]
    for _ in range(6):
        a = fast.decode(tokens, [0, 1, 1])
        b = plain.decode(tokens, [0, 1, 1])
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        tokens = a.argmax(-1).tolist()


def test_models_outside_the_family_decode_through_their_forward():
    model = make_tiny_llama(64)
    assert supports_fast_decode(model)
    model.config.hidden_act = "gelu"
    assert not supports_fast_decode(model)
