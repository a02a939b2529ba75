"""Packed prefill of a prompt whose adapter is a prefix-tuning one (``adapters/prefix_tuning.py``).

The runner passes the packed prompts' prefixes to the decoder as ``prefix_kv`` (one entry per prompt,
None where its adapter has no prefix); transformers hands that keyword through to the attention
function, which calls :func:`prefix_prompt_attention` for those prompts. Every query of the prompt
attends to the whole prefix and causally to the prompt, as PEFT's forward with the prefix as
``past_key_values`` does.
"""

from __future__ import annotations

import torch

from adapters.prefix_tuning import PrefixKV

PREFIX_KV_KWARG = "prefix_kv"


def prefix_prompt_attention(
    query: torch.Tensor,  # (1, H, T, D)
    key: torch.Tensor,  # (1, KVH, T, D)
    value: torch.Tensor,  # (1, KVH, T, D)
    prefix: PrefixKV,
    layer: int,
    scaling: float | None,
) -> torch.Tensor:
    """One prompt's attention output ``(1, H, T, D)`` over its layer-``layer`` prefix and itself."""
    n, t = prefix.num_virtual_tokens, query.shape[2]
    keys = torch.cat([prefix.keys[layer][None].to(key.dtype), key], dim=2)  # (1, KVH, n + T, D)
    values = torch.cat([prefix.values[layer][None].to(value.dtype), value], dim=2)  # (1, KVH, n + T, D)
    # query i sees the n prefix columns and prompt columns 0..i: (T, n + T), True = attend
    mask = torch.ones(t, n + t, dtype=torch.bool, device=query.device).tril(diagonal=n)
    return torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
