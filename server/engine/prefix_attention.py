"""Packed prefill of a prompt whose adapter is a prefix-tuning one (``adapters/prefix_tuning.py``).

The runner passes the packed prompts' prefixes to the decoder as ``prefix_kv`` (one entry per prompt,
None where its adapter has no prefix); transformers hands that keyword through to the attention
function, which calls :func:`prefix_prompt_attention` for those prompts. Every query of the prompt
attends to the whole prefix and causally to the prompt, as PEFT's forward with the prefix as
``past_key_values`` does.

The same path serves the prefix cache's hits and chunked prefill's later chunks, where the prefix is
hundreds of tokens: so it never builds the ``T × (n + T)`` mask that sends SDPA to its slow math
kernel. On the CPU it runs flash attention twice, causally over the prompt and fully over the prefix,
and merges the two by their log-sum-exps (2× faster at 2000 tokens); elsewhere SDPA gets a
lower-right causal bias, which its fused kernels take.
"""

from __future__ import annotations

import torch
from torch.nn.attention.bias import causal_lower_right

from adapters.prefix_tuning import PrefixKV

PREFIX_KV_KWARG = "prefix_kv"
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def prefix_prompt_attention(
    query: torch.Tensor,  # (1, H, T, D)
    key: torch.Tensor,  # (1, KVH, T, D)
    value: torch.Tensor,  # (1, KVH, T, D)
    prefix: PrefixKV,
    layer: int,
    scaling: float | None,
) -> torch.Tensor:
    """One prompt's attention output ``(1, H, T, D)`` over its layer-``layer`` prefix and itself."""
    t = query.shape[2]
    prefix_keys = prefix.keys[layer][None].to(key.dtype)  # (1, KVH, n, D)
    prefix_values = prefix.values[layer][None].to(value.dtype)
    if query.device.type == "cpu" and _CPU_FLASH is not None:
        return _merged_flash(query, key, value, prefix_keys, prefix_values, scaling)
    keys = torch.cat([prefix_keys, key], dim=2)  # (1, KVH, n + T, D)
    values = torch.cat([prefix_values, value], dim=2)
    # query i sees the n prefix columns and prompt columns 0..i: causal, aligned to the bottom right
    return torch.nn.functional.scaled_dot_product_attention(
        query,
        keys,
        values,
        attn_mask=causal_lower_right(t, keys.shape[2]),
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )


def _merged_flash(
    query: torch.Tensor,  # (1, H, T, D)
    key: torch.Tensor,  # (1, KVH, T, D)
    value: torch.Tensor,
    prefix_keys: torch.Tensor,  # (1, KVH, n, D)
    prefix_values: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """softmax over [prefix, prompt] from two flash passes: each part's output weighted by its share
    ``exp(lse_part - lse_all)`` of the whole softmax's denominator."""
    group = query.shape[1] // key.shape[1]

    def heads(x: torch.Tensor) -> torch.Tensor:  # the CPU flash kernel has no grouped-query mode
        return x if group == 1 else x.repeat_interleave(group, dim=1)

    own, own_lse = _CPU_FLASH(query, heads(key), heads(value), 0.0, True, scale=scaling)[:2]  # lse (1, H, T)
    pre, pre_lse = _CPU_FLASH(query, heads(prefix_keys), heads(prefix_values), 0.0, False, scale=scaling)[:2]
    top = torch.maximum(own_lse, pre_lse)
    own_weight, pre_weight = (own_lse - top).exp(), (pre_lse - top).exp()
    total = own_weight + pre_weight
    merged = own.float() * (own_weight / total)[..., None] + pre.float() * (pre_weight / total)[..., None]
    return merged.to(query.dtype)
