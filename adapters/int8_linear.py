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
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from adapters import kernels

logger = logging.getLogger(__name__)

INT8_MAX = 127


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, in)`` floats → int8 ``(out, in)`` and fp32 ``(out,)`` scales with ``W ≈ W_q · s``.

    An all-zero row gets scale 1 (its int8 row is zero), so no scale is 0 or non-finite.
    """
    weight = weight.detach().float()
    absmax = weight.abs().amax(dim=1)  # (out,)
    scale = torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax))
    quantized = torch.round(weight / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return quantized.contiguous(), scale.contiguous()


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight and one fp32 scale per output channel; fp32 in and out.

    Args:
        weight: int8 ``(out, in)``.
        scale: fp32 ``(out,)``.
        bias: fp32 ``(out,)`` or None.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self._op = kernels.int8_linear()
        self._no_bias = torch.empty(0)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        weight, scale = quantize_per_channel(linear.weight)
        return cls(weight, scale, linear.bias)

    def dequantized(self) -> torch.Tensor:
        """The ``(out, in)`` fp32 weight this layer computes with."""
        return self.weight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float().contiguous()  # (N, in)
        if self._op is not None:
            y = self._op(x2, self.weight, self.scale, self._no_bias if self.bias is None else self.bias)
        else:  # no compiled kernel here: the same numbers up to summation order, much slower
            y = (x2 @ self.weight.T.float()) * self.scale
            if self.bias is not None:
                y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


def quantize_model_int8(model: nn.Module) -> int:
    """Replaces every ``nn.Linear`` of ``model`` (the LM head too) by an :class:`Int8Linear`; the
    embeddings stay fp32. Returns how many layers were replaced."""
    if kernels.int8_linear() is None:
        logger.warning(
            "w8 without the compiled kernel: correct but slow (build it: python -m adapters.kernels)"
        )
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(module))
    return len(targets)
