"""The training loss over label positions only: the LM head and cross-entropy run on the rows whose next
token is trained (assistant tokens), in chunks whose logits are recomputed in the backward pass.

The model's own loss projects every position onto the whole vocabulary in fp32 and keeps those
``(batch, length, vocab)`` logits (and their gradient) for the backward pass. Here the decoder runs with
``logits_to_keep=1`` (one position's logits, unused), a forward hook takes its final hidden states, and
only the positions that predict a label are projected, ``CHUNK_ROWS`` at a time under activation
checkpointing, so at most one chunk's logits exist at once. The value equals the model's loss (same
shift, same ``ignore_index``, same sum / ``num_items_in_batch`` or mean reduction).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from training.tokenization import IGNORE_INDEX

CHUNK_ROWS = 256


def _decoder_body(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer body (its output is the final, normed hidden state) under PEFT's wrappers."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder() if hasattr(inner, "get_decoder") else inner.model


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    logits = F.linear(hidden.to(weight.dtype), weight, bias)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def label_position_loss(
    model: torch.nn.Module,
    inputs: dict,
    divisor: torch.Tensor | int | None = None,
    chunk_rows: int = CHUNK_ROWS,
):
    """``(loss, outputs)`` for a causal-LM batch with ``labels``; ``divisor`` None means the mean over
    label positions (the model's reduction without ``num_items_in_batch``)."""
    labels = inputs["labels"]
    captured: dict = {}

    def keep(_module, _args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    hook = _decoder_body(model).register_forward_hook(keep)
    try:
        rest = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**rest, logits_to_keep=1)
    finally:
        hook.remove()
    hidden = captured["hidden"]
    extra = hidden.shape[1] - labels.shape[1]  # prompt tuning: virtual tokens come first, never labels
    if extra > 0:
        labels = F.pad(labels, (extra, 0), value=IGNORE_INDEX)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    rows = hidden[:, :-1][mask]
    wanted = targets[mask]
    head = model.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_rows):
        part = rows[start : start + chunk_rows]
        total = total + checkpoint(
            _chunk_loss, part, wanted[start : start + chunk_rows], head.weight, head.bias, use_reentrant=False
        )
    if divisor is None:
        divisor = mask.sum()
    if isinstance(divisor, torch.Tensor):
        divisor = divisor.to(total.device)
    return total / divisor, outputs
