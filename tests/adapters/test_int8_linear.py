"""The w8 compute path: loraplex's weight-only int8 kernel and its per-channel quantization."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters import kernels
from adapters.int8_linear import Int8Linear, quantize_model_int8, quantize_per_channel

needs_kernel = pytest.mark.skipif(kernels.int8_linear() is None, reason="no C++ compiler here")


def _layer(out_features: int, in_features: int, bias: bool, seed: int) -> Int8Linear:
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator))
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=generator))
    return Int8Linear.from_linear(linear)


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 20),
    in_features=st.integers(1, 70),
    out_features=st.integers(1, 23),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_kernel_computes_the_dequantized_product(rows, in_features, out_features, bias, seed):
    """Any shape (K and N tails, tiles of 1..6 rows): the kernel's result is x Ŵᵀ + b in fp32."""
    layer = _layer(out_features, in_features, bias, seed)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed + 1))
    expected = x.double() @ layer.dequantized().double().T
    if bias:
        expected += layer.bias.double()
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * (1 + in_features))


@needs_kernel
def test_a_rows_numbers_do_not_depend_on_its_batch():
    """Bitwise: each row of a 40-row call equals that row computed alone and in every smaller batch
    (tiles of 6 rows, the one-row path, and the tail tiles all compute a row the same way)."""
    layer = _layer(37, 100, bias=True, seed=3)
    x = torch.randn(40, 100, generator=torch.Generator().manual_seed(4))
    batched = layer(x)
    for row in range(40):
        assert torch.equal(layer(x[row : row + 1])[0], batched[row])
    for size in (2, 5, 7, 13):
        assert torch.equal(layer(x[:size]), batched[:size])


def test_per_channel_quantization_bounds():
    weight = torch.randn(6, 33)
    weight[2] = 0  # an all-zero row must not produce a zero or non-finite scale
    quantized, scale = quantize_per_channel(weight)
    assert quantized.dtype == torch.int8 and int(quantized.abs().max()) <= 127
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(quantized[2], torch.zeros(33, dtype=torch.int8))
    error = (quantized.float() * scale[:, None] - weight).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()


def test_quantize_model_replaces_every_linear_and_keeps_the_embeddings():
    from tests.tiny_models import make_tiny_llama

    model = make_tiny_llama(64)
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    embeddings = model.get_input_embeddings().weight.clone()
    assert quantize_model_int8(model) == linears
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
