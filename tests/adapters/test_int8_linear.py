"""The w8 compute path: loraplex's weight-only int8 kernel and its per-channel quantization."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters import kernels
from adapters.int8_linear import Int8Linear, quantize_activations, quantize_model_int8, quantize_per_channel

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


# w8a8: int8 activations per block (issue 14)

needs_a8_kernel = pytest.mark.skipif(kernels.int8_linear_a8() is None, reason="no C++ compiler here")


def _a8_layer(out_features: int, in_features: int, bias: bool, seed: int, block: int = 64) -> Int8Linear:
    layer = _layer(out_features, in_features, bias, seed)
    return Int8Linear(layer.weight, layer.scale, layer.bias, activation_block=block)


def _a8_reference(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """The w8a8 product in fp64 from PyTorch's quantization of ``x``: what the kernel must compute."""
    expected = layer.quantized_input(x).double() @ layer.dequantized().double().T
    return expected + layer.bias.double() if layer.bias is not None else expected


@st.composite
def _activations(draw, rows: int, in_features: int) -> torch.Tensor:
    """Normal rows scaled per 16-element stretch by 0, tiny (below and above the tiny limit) or huge."""
    seed = draw(st.integers(0, 2**16))
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed))
    stretches = -(-in_features // 16)
    magnitudes = draw(
        st.lists(
            st.sampled_from([0.0, 1e-35, 1e-25, 1e-6, 1.0, 1e3, 1e20]),
            min_size=rows * stretches,
            max_size=rows * stretches,
        )
    )
    factor = torch.tensor(magnitudes).view(rows, stretches).repeat_interleave(16, dim=1)[:, :in_features]
    return x * factor


@needs_a8_kernel
@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    rows=st.integers(1, 12),
    in_features=st.integers(1, 300),
    out_features=st.integers(1, 11),
    block=st.sampled_from([32, 64, 128]),
    bias=st.booleans(),
)
def test_w8a8_kernel_computes_the_quantized_product(data, rows, in_features, out_features, block, bias):
    """Any shape (K not a multiple of the block: tails), zero, tiny and huge activations: the kernel's
    result is the product of PyTorch's quantized activations and the dequantized weight, to fp32 rounding,
    with no NaN from a block of zeros."""
    layer = _a8_layer(out_features, in_features, bias, data.draw(st.integers(0, 2**16)), block)
    x = data.draw(_activations(rows, in_features))
    expected = _a8_reference(layer, x)
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    assert torch.isfinite(got).all()
    # each block's scale times an exact int32 dot: fp32 rounding relative to the summed magnitudes
    magnitude = layer.quantized_input(x).abs().double() @ layer.dequantized().abs().double().T
    slack = 1e-5 * magnitude + (1e-6 * layer.bias.double().abs() if bias else 0) + 1e-30
    assert ((got.double() - expected).abs() <= slack).all()


@needs_a8_kernel
@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40),
    in_features=st.integers(1, 200),
    out_features=st.integers(1, 13),
    seed=st.integers(0, 2**16),
)
def test_w8a8_rows_do_not_depend_on_their_batch(rows, in_features, out_features, seed):
    """Bitwise: every row of a batch of any size equals that row alone, and the ISA this CPU uses
    computes the same bits as the portable loop."""
    layer = _a8_layer(out_features, in_features, True, seed)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed + 1))
    batched = layer(x)
    for row in range(rows):
        assert torch.equal(layer(x[row : row + 1])[0], batched[row])
    portable = kernels.int8_linear_a8()(x, layer.weight, layer.scale, layer.bias, 64, "portable")
    assert torch.equal(portable, batched)


def test_w8a8_activation_quantization_bounds():
    """Per block: |q| <= 127, x ≈ q·s within s/2, a zero block scale 0, a non-finite block scale NaN."""
    x = torch.randn(3, 150) * 5
    x[1, 64:128] = 0
    x[2, 0] = float("inf")
    q, scale = quantize_activations(x, 64)
    assert q.shape == (3, 192) and scale.shape == (3, 3) and int(q.abs().max()) <= 127
    assert scale[1, 1] == 0 and torch.equal(q[1, 64:128], torch.zeros(64, dtype=torch.int8))
    assert torch.isnan(scale[2, 0]) and torch.equal(q[2, :64], torch.zeros(64, dtype=torch.int8))
    assert torch.equal(q[:, 150:], torch.zeros(3, 42, dtype=torch.int8))
    finite = torch.isfinite(scale)
    error = (
        q.float().view(3, 3, 64) * scale[..., None] - torch.nn.functional.pad(x, (0, 42)).view(3, 3, 64)
    ).abs()
    assert (error[finite] <= scale[finite][:, None] / 2 * (1 + 1e-6)).all()


@needs_a8_kernel
def test_w8a8_a_non_finite_activation_poisons_only_its_row():
    layer = _a8_layer(5, 100, False, seed=1)
    x = torch.randn(3, 100)
    x[1, 7] = float("nan")
    y = layer(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


def test_w8a8_rejects_weights_it_cannot_sign_and_bad_blocks():
    with pytest.raises(ValueError, match="-128"):
        Int8Linear(torch.full((2, 4), -128, dtype=torch.int8), torch.ones(2), activation_block=64)
    with pytest.raises(ValueError, match="48"):
        Int8Linear(torch.zeros(2, 4, dtype=torch.int8), torch.ones(2), activation_block=48)


@needs_a8_kernel
def test_every_isa_this_cpu_has_computes_the_portable_bits():
    """Fails (instead of the kernel quietly falling back) where an ISA path disagrees with the loop."""
    best = kernels._module().int8_linear_a8_isa()
    isas = ("avx512vnni", "avx2", "portable")
    op = kernels.int8_linear_a8()
    layer = _a8_layer(13, 515, True, seed=5)
    x = torch.randn(9, 515, generator=torch.Generator().manual_seed(6)) * 4
    x[3, 128:256] = 0
    expected = op(x, layer.weight, layer.scale, layer.bias, 64, "portable")
    for isa in isas[isas.index(best) :]:
        assert torch.equal(op(x, layer.weight, layer.scale, layer.bias, 64, isa), expected), isa
    assert kernels.int8_linear_a8_isa() == best
