"""The label-position loss equals the model's own loss, and gives the same gradients, for every trained
adapter type (prompt tuning adds virtual positions in front, prefix tuning adds past keys/values)."""

from __future__ import annotations

import pytest
import torch

from training.args import LoRAArgs
from training.label_loss import label_position_loss
from training.lora_model import attach_new_adapter, prepare_for_training
from training.tokenization import IGNORE_INDEX

METHODS = {  # LoRA-family dropout off, so the two forwards see the same function
    "lora": {"dropout": 0.0},
    "dora": {"dropout": 0.0},
    "ia3": {},
    "prompt-tuning": {},
    "prefix-tuning": {},
}


def _batch(vocab: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX  # the prompt
    labels[1, 8:] = IGNORE_INDEX
    labels[2, 9] = IGNORE_INDEX  # a turn not trained inside the completion
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("chunk_rows", [4, 256])
def test_label_position_loss_equals_model_loss(tiny_base, method, chunk_rows):
    args = LoRAArgs(method=method, **METHODS[method])
    torch.manual_seed(0)
    model = attach_new_adapter(prepare_for_training(tiny_base, False), args)
    model.train()
    for p in model.parameters():  # a non-zero start, so every adapter's gradient is informative
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    batch = _batch(model.get_output_embeddings().weight.shape[0], seed=1)

    reference = model(**batch).loss
    reference.backward()
    expected = _grads(model)
    model.zero_grad()

    loss, _ = label_position_loss(model, batch, None, chunk_rows=chunk_rows)
    loss.backward()
    got = _grads(model)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    assert expected and expected.keys() == got.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    model.zero_grad()
    n_items = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    summed, _ = label_position_loss(model, batch, torch.tensor(7), chunk_rows=chunk_rows)
    torch.testing.assert_close(summed, reference * n_items / 7, rtol=1e-5, atol=1e-6)
