"""Attention for the engine's two kinds of forward pass, registered with transformers as ``"loraplex"``.

- *Packed prefill*: several prompts run end to end as one sequence (the linear layers see every
  prompt token in one matrix). The runner passes ``cu_seq_lens_q`` (the prompts' boundaries, as for
  flash-attention's varlen kernels); each prompt attends causally to itself only, one SDPA call per
  prompt, so no ``ΣT × ΣT`` mask is built and no cross-prompt scores are computed.
- *Decode*: one query token per row against the batch KV cache with a boolean mask. Grouped-query
  heads are folded into the query (``(B, kv_heads, group, D)``), so keys and values are read in place,
  never repeated, and the scores are two batched matmuls. On the CPU this is 2-3× faster than
  SDPA's flash kernel, which is built for long queries.

Any other call (no boundaries, a query longer than one token with a mask) is plain SDPA with the
masks transformers builds for it, so the model stays an ordinary model outside the engine.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from server.engine.prefix_attention import PREFIX_KV_KWARG, prefix_prompt_attention

ATTENTION_NAME = "loraplex"


def engine_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, H, T, D)
    key: torch.Tensor,  # (B, KVH, S, D)
    value: torch.Tensor,  # (B, KVH, S, D)
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Returns ``((B, T, H, D), None)`` like transformers' attention functions."""
    boundaries = kwargs.get("cu_seq_lens_q")
    if boundaries is not None and query.shape[0] == 1 and dropout == 0.0:
        prefixes = kwargs.get(PREFIX_KV_KWARG)  # prefix tuning: per prompt, or None
        return _packed_prefill(query, key, value, boundaries, scaling, prefixes, module), None
    decode_step = query.shape[2] == 1 and attention_mask is not None and attention_mask.dtype == torch.bool
    plain = dropout == 0.0 and "softcap" not in kwargs and getattr(module, "sliding_window", None) is None
    if decode_step and plain:
        return decode_attention(query, key, value, attention_mask, scaling), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def _packed_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    boundaries: torch.Tensor,
    scaling,
    prefixes=None,
    module: torch.nn.Module | None = None,
) -> torch.Tensor:
    gqa = query.shape[1] != key.shape[1]
    bounds = boundaries.tolist()
    parts = []
    for i, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if prefixes is not None and prefixes[i] is not None:  # a prefix-tuned prompt
            q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
            parts.append(prefix_prompt_attention(q, k, v, prefixes[i], module.layer_idx, scaling))
            continue
        parts.append(
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, start:end],
                key[:, :, start:end],
                value[:, :, start:end],
                is_causal=True,
                scale=scaling,
                enable_gqa=gqa,
            )
        )
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # (1, H, ΣT, D)
    return out.transpose(1, 2).contiguous()


def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling
) -> torch.Tensor:
    """One query token per row ``(B, H, 1, D)`` against the batch cache ``(B, KVH, S, D)`` with the
    boolean mask ``(B, 1, 1, S)``; returns ``(B, 1, H, D)``."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    scale = scaling if scaling is not None else dim**-0.5
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # query heads grouped by their kv head
    if key.dtype == torch.float32:
        scores = torch.matmul(q, key.transpose(-1, -2))  # (B, KVH, G, S)
    else:  # reduced-precision CPU matmuls copy a transposed strided key; keys-first reads it in place
        scores = torch.matmul(key, q.transpose(-1, -2)).transpose(-1, -2)
    scores = scores.float().mul_(scale).masked_fill_(~mask, float("-inf"))  # mask (B, 1, 1, S)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # (B, KVH, G, D)
    return out.reshape(batch, 1, heads, dim)


def use_engine_attention(model: torch.nn.Module) -> None:
    """Makes ``model`` (a transformers causal LM) run its attention through :func:`engine_attention`."""
    AttentionInterface.register(ATTENTION_NAME, engine_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)  # ordinary calls get SDPA's masks
    model.set_attn_implementation(ATTENTION_NAME)
