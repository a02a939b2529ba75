"""Prefix tuning (https://arxiv.org/abs/2101.00190): learned per-layer keys and values before the prompt.

PEFT saves one ``prompt_embeddings`` tensor of shape ``(num_virtual_tokens, num_layers·2·token_dim)``
(``token_dim = kv_heads·head_dim`` on grouped-query models) and its ``PeftModelForCausalLM.forward``
hands it to the base model as ``past_key_values``: per layer a key and a value of
``(kv_heads, num_virtual_tokens, head_dim)``, used as they are (no rotary embedding is applied to them).
The prompt then takes positions ``n … n+T-1`` (transformers counts the cached prefix as seen tokens).
With ``prefix_projection`` PEFT 0.21 saves the MLP's *output* (the projected prefix, same shape), so
both kinds are read the same way; a file that still holds the MLP's weights is refused.

The server writes the prefix into the row's KV cache in the columns just before its prompt
(``server/engine/runner.py``); only that row's attention sees it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from adapters.prompt_tuning import PROMPT_EMBEDDINGS_KEY, positive_int


@dataclass(frozen=True)
class PrefixKV:
    """One adapter's per-layer prefix."""

    keys: torch.Tensor  # (num_layers, kv_heads, num_virtual_tokens, head_dim)
    values: torch.Tensor  # (num_layers, kv_heads, num_virtual_tokens, head_dim)

    @property
    def num_virtual_tokens(self) -> int:
        return self.keys.shape[2]

    def num_bytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def to(self, device: torch.device, dtype: torch.dtype) -> PrefixKV:
        return PrefixKV(self.keys.to(device=device, dtype=dtype), self.values.to(device=device, dtype=dtype))


def _check_prefix_config(config: Mapping, problems: list[str]) -> bool:
    """Appends every problem with the config's sizes; True when they are all usable."""
    fine = True
    for key in ("num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim"):
        if not positive_int(config.get(key)):
            problems.append(f"{key} must be a positive integer, got {config.get(key)!r}")
            fine = False
    if config.get("num_transformer_submodules", 1) != 1:
        problems.append(
            "prefix tuning for encoder-decoder models (num_transformer_submodules != 1) is not supported"
        )
    if fine and config["token_dim"] % config["num_attention_heads"]:
        problems.append(
            f"token_dim {config['token_dim']} is not a multiple of num_attention_heads "
            f"{config['num_attention_heads']}"
        )
        fine = False
    return fine


@dataclass(frozen=True)
class AttentionShape:
    """What a prefix must match in the base model."""

    num_layers: int
    kv_heads: int
    head_dim: int


def read_prefix(
    config: Mapping,
    tensors: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    problems: list[str],
    base: AttentionShape | None = None,
) -> PrefixKV | None:
    """The per-layer prefix of a PEFT prefix-tuning folder, or None with every problem appended.

    Args:
        config: the adapter's config.
        tensors: every tensor of its weights file by key.
        dtype: dtype of the returned prefix.
        problems: every problem found is appended here.
        base: the base model's attention sizes, when known: the config's must match them.
    """
    sizes_fine = _check_prefix_config(config, problems)
    if sizes_fine and base is not None:
        heads = config["num_attention_heads"]
        problems.extend(_fit_problems(config["num_layers"], heads, config["token_dim"] // heads, base))
    unexpected = sorted(set(tensors) - {PROMPT_EMBEDDINGS_KEY})
    if unexpected:
        problems.append(
            f"unexpected tensors {unexpected} (a prefix-tuning adapter holds only {PROMPT_EMBEDDINGS_KEY}, "
            "the projected prefix)"
        )
    embeddings = tensors.get(PROMPT_EMBEDDINGS_KEY)
    if embeddings is None:
        problems.append(f"the adapter holds no {PROMPT_EMBEDDINGS_KEY}")
        return None
    if not sizes_fine:
        return None
    n, layers, heads, dim = (
        config[k] for k in ("num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim")
    )
    expected = (n, layers * 2 * dim)
    if tuple(embeddings.shape) != expected:
        problems.append(
            f"{PROMPT_EMBEDDINGS_KEY} has shape {tuple(embeddings.shape)}, expected {expected} "
            "(num_virtual_tokens, num_layers·2·token_dim)"
        )
        return None
    if not torch.isfinite(embeddings).all():
        problems.append(f"{PROMPT_EMBEDDINGS_KEY} contain NaN or infinity")
        return None
    if problems:
        return None
    # PEFT's get_prompt: view (n, 2L, heads, head_dim), permute to (2L, heads, n, head_dim); layer l's
    # key is entry 2l and its value 2l+1.
    kv = embeddings.to(dtype).view(n, layers * 2, heads, dim // heads).permute(1, 2, 0, 3)  # (2L, H, n, D)
    return PrefixKV(kv[0::2].contiguous(), kv[1::2].contiguous())


def prefix_fit_problems(prefix: PrefixKV, base: AttentionShape) -> list[str]:
    """Every way ``prefix`` does not fit a base with these attention sizes (empty: it fits)."""
    layers, heads, _, dim = prefix.keys.shape
    return _fit_problems(layers, heads, dim, base)


def _fit_problems(layers: int, heads: int, head_dim: int, base: AttentionShape) -> list[str]:
    problems = []
    if layers != base.num_layers:
        problems.append(f"the prefix is for {layers} layers (num_layers), the base has {base.num_layers}")
    if heads != base.kv_heads:
        problems.append(
            f"the prefix has {heads} key/value heads per layer (num_attention_heads), the base has "
            f"{base.kv_heads}"
        )
    if head_dim != base.head_dim:
        problems.append(
            f"the prefix's heads are {head_dim} wide (token_dim / num_attention_heads), the base's are "
            f"{base.head_dim}"
        )
    return problems


def attention_shape_of(model: torch.nn.Module) -> AttentionShape | None:
    """A transformers model's decoder layers, key/value heads and head size (None for a model without
    a transformers config, which then takes no prefix-tuning adapter)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return None
    config = config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return AttentionShape(config.num_hidden_layers, kv_heads, head_dim)
