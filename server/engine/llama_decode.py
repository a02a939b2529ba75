"""The decode step of Llama-family models, without transformers' module plumbing.

A decode step runs one token per row through every layer. Through ``model(...)`` each layer costs
about a hundred small tensor operations and Python calls (argument handling, cache objects, mask
builders, hooks), which at one row on a CPU take longer than the layer's arithmetic: profiled on
SmolLM2-135M, ~4000 ATen calls per step. This module runs the same layers' own submodules (the
adapter-wrapped projections, so every row keeps its adapter) with only the operations the arithmetic
needs, writing keys and values straight into the batch KV cache. Prefill still runs through the
model's own forward, so any model keeps working; models outside the family (checked once at start)
decode through transformers as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from server.engine.attention import decode_attention
from server.engine.kv_cache import BatchKVCache

# Architectures whose decoder layer is exactly: RMSNorm → q/k/v → RoPE → attention → o_proj → residual;
# RMSNorm → down(act(gate) * up) → residual (biases, if any, live in the projections).
_FAMILY = frozenset({"llama", "mistral", "qwen2"})


def supports_fast_decode(model: nn.Module) -> bool:
    """Whether :class:`LlamaDecodeStep` computes ``model``'s decode step (else use its forward)."""
    config = model.config.get_text_config(decoder=True)
    if config.model_type not in _FAMILY or getattr(config, "hidden_act", None) != "silu":
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    decoder = model.get_decoder()
    layer = decoder.layers[0]
    needed = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
    if not all(hasattr(layer, name) for name in needed) or not hasattr(decoder, "rotary_emb"):
        return False
    attention, mlp = layer.self_attn, layer.mlp
    if any(hasattr(attention, name) for name in ("q_norm", "k_norm")):  # Qwen3-style: not this family
        return False
    return all(hasattr(attention, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and all(
        hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")
    )


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """transformers' Llama RMSNorm: normalised in fp32, cast back, then scaled."""
    eps = norm.variance_epsilon
    if x.dtype == torch.float32:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), norm.weight, eps)
    return norm.weight * torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``t`` ``(B, heads, D)`` with ``cos``/``sin`` ``(B, 1, D)`` (rotate-half form)."""
    half = t.shape[-1] // 2
    rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return t * cos + rotated * sin


class LlamaDecodeStep:
    """One decode step over the running batch for a model :func:`supports_fast_decode` accepts."""

    def __init__(self, model: nn.Module, kv: BatchKVCache):
        self.model, self.kv = model, kv
        self.decoder = model.get_decoder()
        self.layers = list(self.decoder.layers)
        config = model.config.get_text_config(decoder=True)
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = self.layers[0].self_attn.scaling
        self.embed = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()

    def __call__(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        write: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, V)`` for ``input_ids`` ``(B, 1)``, mask ``(B, 1, 1, S)``; writes the step's K/V.

        ``write(layer, k, v)`` stores a layer's new ``(B, nkv, 1, D)`` keys and values and returns the
        ``(B, nkv, S, D)`` keys and values to attend to: the batch cache's own by default, the
        fixed-shape buffers of a CUDA graph's step (``server/engine/cuda_graphs.py``) otherwise.
        """
        write = write or self.kv.write
        batch = input_ids.shape[0]
        x = self.embed(input_ids)[:, 0]  # (B, H)
        cos, sin = self.decoder.rotary_emb(x[:, None], position_ids)  # (B, 1, D) each
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for index, layer in enumerate(self.layers):
            attention, mlp = layer.self_attn, layer.mlp
            h = _rms_norm(x, layer.input_layernorm)
            q = _rope(attention.q_proj(h).view(batch, self.heads, self.head_dim), cos, sin)  # (B, nh, D)
            k = _rope(attention.k_proj(h).view(batch, self.kv_heads, self.head_dim), cos, sin)  # (B, nkv, D)
            v = attention.v_proj(h).view(batch, self.kv_heads, self.head_dim)
            keys, values = write(index, k[:, :, None], v[:, :, None])  # (B, nkv, S, D)
            out = decode_attention(q[:, :, None], keys, values, mask, self.scaling)  # (B, 1, nh, D)
            x = x + attention.o_proj(out.reshape(batch, self.heads * self.head_dim))
            h = _rms_norm(x, layer.post_attention_layernorm)
            x = x + mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        return self.lm_head(_rms_norm(x, self.decoder.norm))  # (B, V)
