"""QLoRA on a 4-bit base on the CPU: gradients must survive an evaluation pass (bitsandbytes repacking)."""

from __future__ import annotations

import torch

from adapters.base_model import load_base_model
from training.args import LoRAArgs
from training.lora_model import attach_new_adapter, prepare_for_training


def lora_grads(model, input_ids) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_an_eval_pass_does_not_change_training_gradients(tiny_base_dir):
    base = load_base_model(tiny_base_dir, quantization="nf4", device="cpu")
    torch.manual_seed(0)
    trainable = prepare_for_training(base, gradient_checkpointing=False)
    model = attach_new_adapter(trainable, LoRAArgs(dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)  # so that lora_A gets gradients too
    input_ids = torch.randint(3, 200, (2, 12))
    before = lora_grads(model, input_ids)
    model.eval()
    with torch.no_grad():  # what Trainer.evaluate does between training steps
        model(input_ids=input_ids)
    after = lora_grads(model, input_ids)
    assert before.keys() == after.keys() and len(before) > 0
    for name in before:
        torch.testing.assert_close(after[name], before[name], msg=name)


def test_offline_generation_with_an_adapter_after_a_base_run(tiny_base_dir, tiny_adapter_sources):
    """An adapter loaded after base generations (which repack 4-bit weights) gives its own outputs."""
    from training.evaluate import PeftGreedyGenerator

    folders = tiny_adapter_sources.__getitem__
    prompts = [[{"role": "user", "content": "hello there"}], [{"role": "user", "content": "abc"}]]
    adapter_first = PeftGreedyGenerator(
        load_base_model(tiny_base_dir, quantization="nf4", device="cpu"), folders
    )
    expected = adapter_first(prompts, "all-r8", 6)
    base_first = PeftGreedyGenerator(
        load_base_model(tiny_base_dir, quantization="nf4", device="cpu"), folders
    )
    base_first(prompts, None, 6)
    assert base_first(prompts, "all-r8", 6) == expected
