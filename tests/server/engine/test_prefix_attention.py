"""Attention of a prompt over a prefix (prefix tuning, a prefix-cache hit, earlier chunks): both of its
kernels equal the masked softmax over [prefix, prompt] it stands for."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.prefix_tuning import PrefixKV
from server.engine import prefix_attention
from server.engine.prefix_attention import prefix_prompt_attention


def _reference(query, key, value, prefix: PrefixKV, layer: int, scaling: float) -> torch.Tensor:
    """Every query attends to the whole prefix and causally to the prompt, in fp64."""
    keys = torch.cat([prefix.keys[layer][None], key], dim=2).double()
    values = torch.cat([prefix.values[layer][None], value], dim=2).double()
    group = query.shape[1] // key.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    n, t = prefix.num_virtual_tokens, query.shape[2]
    scores = query.double() @ keys.transpose(-1, -2) * scaling  # (1, H, T, n + T)
    allowed = torch.ones(t, n + t, dtype=torch.bool).tril(diagonal=n)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ values


FLASH = prefix_attention._CPU_FLASH


@pytest.mark.parametrize("merged", [True, False], ids=["cpu-merged-flash", "lower-right-bias"])
@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 70),
    t=st.integers(1, 70),
    kv_heads=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 3]),
    seed=st.integers(0, 1000),
)
def test_prefix_attention_is_the_masked_softmax_over_prefix_and_prompt(merged, n, t, kv_heads, group, seed):
    if merged and FLASH is None:
        pytest.skip("this torch has no CPU flash-attention op")
    generator = torch.Generator().manual_seed(seed)
    dim, layers = 8, 2
    query = torch.randn(1, kv_heads * group, t, dim, generator=generator)
    key = torch.randn(1, kv_heads, t, dim, generator=generator)
    value = torch.randn(1, kv_heads, t, dim, generator=generator)
    prefix = PrefixKV(
        torch.randn(layers, kv_heads, n, dim, generator=generator),
        torch.randn(layers, kv_heads, n, dim, generator=generator),
    )
    prefix_attention._CPU_FLASH = FLASH if merged else None
    try:
        got = prefix_prompt_attention(query, key, value, prefix, 1, dim**-0.5)
    finally:
        prefix_attention._CPU_FLASH = FLASH
    assert got.shape == query.shape
    torch.testing.assert_close(
        got.double(), _reference(query, key, value, prefix, 1, dim**-0.5), rtol=1e-5, atol=1e-5
    )
