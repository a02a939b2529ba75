"""Prompt tuning (https://arxiv.org/abs/2104.08691): learned virtual-token embeddings before the prompt.

PEFT's ``PeftModelForCausalLM`` prepends the ``(num_virtual_tokens, token_dim)`` embeddings to the
prompt's token embeddings; the virtual tokens take positions ``0 … n-1`` and the prompt follows. The
server does the same at prefill (``server/engine/runner.py``): the row's KV cache then holds them, and
decoding needs nothing more. The adapter changes no weight, so there is nothing to merge or export.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

PROMPT_EMBEDDINGS_KEY = "prompt_embeddings"


def positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def read_virtual_tokens(
    config: Mapping, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, problems: list[str]
) -> torch.Tensor | None:
    """The ``(num_virtual_tokens, token_dim)`` embeddings of a PEFT prompt-tuning folder, or None with
    every problem appended to ``problems``."""
    virtual, dim = config.get("num_virtual_tokens"), config.get("token_dim")
    if not positive_int(virtual):
        problems.append(f"num_virtual_tokens must be a positive integer, got {virtual!r}")
    if not positive_int(dim):
        problems.append(f"token_dim must be a positive integer, got {dim!r}")
    if config.get("num_transformer_submodules", 1) != 1:
        problems.append(
            "prompt tuning for encoder-decoder models (num_transformer_submodules != 1) is not supported"
        )
    unexpected = sorted(set(tensors) - {PROMPT_EMBEDDINGS_KEY})
    if unexpected:
        problems.append(
            f"unexpected tensors {unexpected} (a prompt-tuning adapter holds only {PROMPT_EMBEDDINGS_KEY})"
        )
    embeddings = tensors.get(PROMPT_EMBEDDINGS_KEY)
    if embeddings is None:
        problems.append(f"the adapter holds no {PROMPT_EMBEDDINGS_KEY}")
        return None
    if not (positive_int(virtual) and positive_int(dim)):
        return None
    if tuple(embeddings.shape) != (virtual, dim):
        problems.append(
            f"{PROMPT_EMBEDDINGS_KEY} has shape {tuple(embeddings.shape)}, expected ({virtual}, {dim})"
        )
        return None
    if not torch.isfinite(embeddings).all():
        problems.append(f"{PROMPT_EMBEDDINGS_KEY} contain NaN or infinity")
        return None
    return None if problems else embeddings.to(dtype)
