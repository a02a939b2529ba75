"""``w8``: weight-only int8 linear layers for serving on the CPU (loraplex's own kernel).

Each linear layer's weight is quantized once at load, symmetric per output channel
(``W ≈ W_q · s``, ``W_q`` int8, ``s = max|W_row| / 127``); activations stay fp32. The compiled kernel
(``adapters/kernels/int8_linear.cpp``) widens the int8 weights in registers, so a decode step reads a
quarter of fp32's weight bytes, and it computes every row with the same operations whatever the batch
holds: a request's greedy output does not depend on what shares its batch.

Why not bitsandbytes on the CPU: its NF4 path dequantizes every weight to bf16 on every call (its
fused CPU kernel comes from a hub package this product cannot fetch); at one row that is most of a
decode step, and NF4's 16 levels agree less often with the fp32 model than int8's 255 (figures in
README, "Compute paths"). bitsandbytes stays the quantization on CUDA and a choice on the CPU.

``w8a8``: the same int8 weights, with the activations quantized too, per row in blocks of
``ACTIVATION_BLOCK`` elements (one absmax scale each, as llama.cpp's Q8 activations), so the kernel
multiplies int8 by int8 with exact int32 sums (AVX512-VNNI ``vpdpbusd`` or AVX2 ``vpmaddubsw``;
``adapters/kernels/int8_linear_a8.cpp``) and applies the scales once per block. It is as batch-invariant
as ``w8``, and the ISA does not change its numbers either (issue 14).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from adapters import kernels

logger = logging.getLogger(__name__)

INT8_MAX = 127
ACTIVATION_BLOCK = 64  # w8a8: activations share one scale per this many elements of a row
# w8a8: a block whose absmax is below this is quantized to zeros with scale 0 (127 / absmax would
# overflow fp32); the kernel's kTinyAbsmax
TINY_ABSMAX = 2.0**-100


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, in)`` floats → int8 ``(out, in)`` and fp32 ``(out,)`` scales with ``W ≈ W_q · s``.

    An all-zero row gets scale 1 (its int8 row is zero), so no scale is 0 or non-finite.
    """
    weight = weight.detach().float()
    absmax = weight.abs().amax(dim=1)  # (out,)
    scale = torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax))
    quantized = torch.round(weight / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return quantized.contiguous(), scale.contiguous()


def quantize_activations(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(M, K)`` → int8 ``(M, Kp)`` (zero-padded to whole blocks) and fp32 ``(M, Kp / block)``
    block scales with ``x ≈ q · s`` per block: the w8a8 kernel's quantization, bit for bit.

    A block of zeros (or of magnitudes below ``TINY_ABSMAX``) gets scale 0 and zero values; a block
    holding inf or NaN gets scale NaN, so the outputs it feeds are NaN rather than silently finite.
    """
    rows, in_features = x.shape
    blocks = -(-in_features // block)
    xb = nn.functional.pad(x.float(), (0, blocks * block - in_features)).view(rows, blocks, block)
    finite = torch.isfinite(xb).all(dim=-1)  # (M, nb)
    absmax = torch.where(finite, xb.abs().amax(dim=-1), torch.zeros(()))  # (M, nb)
    live = finite & (absmax >= TINY_ABSMAX)
    safe = torch.where(live, absmax, torch.ones(()))
    inv = torch.where(live, INT8_MAX / safe, torch.zeros(()))  # 127 / absmax, in fp32 as the kernel
    q = torch.round(torch.where(live[..., None], xb, torch.zeros(())) * inv[..., None])
    scale = torch.where(live, safe / INT8_MAX, torch.where(finite, 0.0, float("nan")))
    return q.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8).view(rows, blocks * block), scale


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight and one fp32 scale per output channel; fp32 in and out.

    Args:
        weight: int8 ``(out, in)``, values in [-127, 127].
        scale: fp32 ``(out,)``.
        bias: fp32 ``(out,)`` or None.
        activation_block: None for fp32 activations (``w8``); a multiple of 32 to quantize them to int8
            per row in blocks of that many elements (``w8a8``).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        activation_block: int | None = None,
    ):
        super().__init__()
        if activation_block is not None and (activation_block <= 0 or activation_block % 32):
            raise ValueError(f"activation_block must be a positive multiple of 32, not {activation_block}")
        if weight.numel() and int(weight.min()) < -INT8_MAX:
            raise ValueError(f"int8 weights must lie in [-127, 127]; found {int(weight.min())}")
        self.out_features, self.in_features = weight.shape
        self.activation_block = activation_block
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self._op = kernels.int8_linear() if activation_block is None else kernels.int8_linear_a8()
        self._isa = kernels.int8_linear_a8_isa() or ""
        self._no_bias = torch.empty(0)

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation_block: int | None = None) -> Int8Linear:
        weight, scale = quantize_per_channel(linear.weight)
        return cls(weight, scale, linear.bias, activation_block)

    def dequantized(self) -> torch.Tensor:
        """The ``(out, in)`` fp32 weight this layer computes with."""
        return self.weight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float().contiguous()  # (N, in)
        bias = self._no_bias if self.bias is None else self.bias
        if self._op is not None and self.activation_block is None:
            y = self._op(x2, self.weight, self.scale, bias)
        elif self._op is not None:
            y = self._op(x2, self.weight, self.scale, bias, self.activation_block, self._isa)
        else:  # no compiled kernel here: the same numbers up to summation order, much slower
            y = (self.quantized_input(x2) @ self.weight.T.float()) * self.scale
            if self.bias is not None:
                y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(M, in)`` as this layer's kernel sees it: itself (``w8``), or dequantized from its
        per-block int8 values (``w8a8``)."""
        if self.activation_block is None:
            return x
        q, scale = quantize_activations(x, self.activation_block)  # (M, Kp), (M, nb)
        blocks = scale.shape[1]
        dequantized = q.float().view(x.shape[0], blocks, -1) * scale[..., None]  # (M, nb, block)
        return dequantized.view(x.shape[0], -1)[:, : self.in_features]

    def extra_repr(self) -> str:
        activations = "fp32" if self.activation_block is None else f"int8 per {self.activation_block}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel, "
            f"activations {activations}"
        )


def quantize_model_int8(model: nn.Module, activation_block: int | None = None) -> int:
    """Replaces every ``nn.Linear`` of ``model`` (the LM head too) by an :class:`Int8Linear`; the
    embeddings stay fp32. Returns how many layers were replaced.

    Args:
        model: the model, changed in place.
        activation_block: None for ``w8`` (fp32 activations); ``ACTIVATION_BLOCK`` for ``w8a8``.
    """
    if kernels.int8_linear() is None:
        logger.warning(
            "w8 without the compiled kernel: correct but slow (build it: python -m adapters.kernels)"
        )
    elif activation_block is not None:
        logger.info("w8a8 kernel on this CPU: %s", kernels.int8_linear_a8_isa())
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(module, activation_block))
    return len(targets)
