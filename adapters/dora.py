"""DoRA at inference: the per-row magnitude ratio ``g = m / ‖W + s·B A‖_c``, computed once per module.

PEFT (``tuners/lora/dora.py``, ``variants.py::DoraLinearVariant``) computes, in eval mode,

    y = base(x) + (g - 1) ⊙ (base(x) - b) + g ⊙ s·B A x,   g = m / ‖W + s·B A‖  (norm over ``in``, per row)

which is ``y = g ⊙ (W x + s·B A x) + b``: the ratio scales the base output too, and the bias stays
unscaled. The norm is a constant of the adapter and the base weight (detached in training), so the
server computes ``g`` once when the adapter is installed, on the same weight the layer computes
with: dequantized by bitsandbytes for NF4/int8 bases, the plain weight otherwise.
"""

from __future__ import annotations

import copy
import re
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from adapters.lora import LoRAModule

# PEFT saves "base_model.model.<module>.lora_magnitude_vector" (older versions add ".weight").
MAGNITUDE_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_magnitude_vector(?:\.weight)?$")


def dequantized_weight(linear: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` float32 weight a linear layer computes with (bitsandbytes NF4/int8 or plain)."""
    if hasattr(linear, "dequantized"):  # adapters.int8_linear.Int8Linear (w8)
        return linear.dequantized()
    weight = linear.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        return _dequantized_nf4(weight).float()
    if kind == "Int8Params":
        return _dequantized_int8(linear).float()
    return weight.detach().float()


def _dequantized_nf4(weight: torch.Tensor) -> torch.Tensor:
    """A 4-bit bitsandbytes weight as floats, also after bitsandbytes repacked it for its CPU kernel.

    bitsandbytes (0.50) repacks a ``Linear4bit`` weight in place on AVX512-BF16 CPUs the first time it
    runs in eval mode; the repacked layout is undone on a copy of its state (the inverse mutates it).
    The repacked block scales are bf16, as the repacked kernel computes with them.
    """
    import bitsandbytes.functional as bnbf

    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        if (
            state.absmax.dim() == 2
        ):  # repacked as (in / blocksize, out); the inverse restores it only when nested
            state.absmax = state.absmax.T.reshape(-1).float()  # (blocks,) in row-major block order
    return bnbf.dequantize_4bit(data, state)


def _dequantized_int8(linear: nn.Module) -> torch.Tensor:
    """An int8 bitsandbytes weight as floats: row-wise ``CB · SCB / 127`` (LLM.int8()'s layout)."""
    weight = linear.weight
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = linear.state.SCB
    return weight.data.float() * scb.float().view(-1, 1) / 127.0  # (out, in)


def weight_norm(base_weight: torch.Tensor, module: LoRAModule) -> torch.Tensor:
    """``‖W + s·B A‖`` over the input dimension, per output row: ``(out,)`` float32."""
    return torch.linalg.norm(base_weight.float() + module.delta_weight().to(base_weight.device), dim=1)


def magnitude_scale(base_weight: torch.Tensor, module: LoRAModule) -> torch.Tensor:
    """DoRA's per-output-row ratio ``g = m / ‖W + s·B A‖``: ``(out,)`` float32 (may hold inf/NaN
    where a row's norm is zero; the caller checks)."""
    assert module.magnitude is not None, "magnitude_scale needs a DoRA module"
    return module.magnitude.float().to(base_weight.device) / weight_norm(base_weight, module)


def fold_dora(base_weight: torch.Tensor, module: LoRAModule) -> torch.Tensor:
    """The merged weight ``g ⊙ (W + s·B A)`` (PEFT's ``merge``; the bias is left as it is): ``(out, in)``."""
    merged = base_weight.float() + module.delta_weight().to(base_weight.device)  # (out, in)
    return magnitude_scale(base_weight, module).view(-1, 1) * merged


def check_magnitude(module_name: str, magnitude: torch.Tensor, out_features: int) -> str | None:
    """A problem with a DoRA magnitude vector read from disk, or None."""
    if tuple(magnitude.shape) != (out_features,):
        return f"{module_name}: DoRA magnitude has shape {tuple(magnitude.shape)}, expected ({out_features},)"
    if not torch.isfinite(magnitude).all():
        return f"{module_name}: DoRA magnitude contains NaN or infinity"
    return None
