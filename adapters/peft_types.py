"""The adapter types the server serves, named once: how a PEFT config says which one it is.

``lora`` (``ΔW = (α/r) B A``), ``rslora`` (``α/√r``), ``dora`` (LoRA with a learned per-row magnitude,
https://arxiv.org/abs/2402.09353), ``ia3`` (learned per-feature scaling of activations,
https://arxiv.org/abs/2205.05638), ``prompt_tuning`` (virtual tokens,
https://arxiv.org/abs/2104.08691) and ``prefix_tuning`` (per-layer virtual keys and values,
https://arxiv.org/abs/2101.00190). ``GET /v1/adapters`` shows these names; all of them are also
``loraplex train --method`` choices (the prompt-learning ones spelled with a hyphen).
"""

from __future__ import annotations

from collections.abc import Mapping

LORA = "lora"
RSLORA = "rslora"
DORA = "dora"
IA3 = "ia3"
PROMPT_TUNING = "prompt_tuning"  # virtual tokens at prefill
PREFIX_TUNING = "prefix_tuning"  # virtual keys/values in the row's KV cache
ADAPTER_TYPES = (LORA, RSLORA, DORA, IA3, PROMPT_TUNING, PREFIX_TUNING)
# ``loraplex train --method``: the same types, the prompt-learning ones spelled with a hyphen
TRAIN_METHODS = tuple(kind.replace("_", "-") for kind in ADAPTER_TYPES)
PROMPT_LEARNING_TYPES = frozenset({PROMPT_TUNING, PREFIX_TUNING})
MERGEABLE_TYPES = frozenset({LORA, RSLORA})  # the per-request merge math is LoRA's (B, A) algebra
# PEFT types that add virtual tokens instead of changing weights: nothing to fold into a base model.
VIRTUAL_TOKEN_PEFT_TYPES = frozenset(
    {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING"}
)


def peft_type_of(config: Mapping) -> str:
    """PEFT's own ``peft_type`` field, upper-cased (``LORA``, ``IA3``, ``PROMPT_TUNING`` …)."""
    value = config.get("peft_type", "")
    return str(getattr(value, "value", value)).upper()  # PEFT's own configs hold a PeftType enum


def adapter_type(config: Mapping) -> str:
    """Which of :data:`ADAPTER_TYPES` a (validated) PEFT config describes.

    A DoRA adapter with ``use_rslora`` is ``dora`` (its scaling is α/√r inside the DoRA formula).
    """
    if peft_type_of(config) == "IA3":
        return IA3
    if peft_type_of(config) == "PROMPT_TUNING":
        return PROMPT_TUNING
    if peft_type_of(config) == "PREFIX_TUNING":
        return PREFIX_TUNING
    if config.get("use_dora"):
        return DORA
    if config.get("use_rslora"):
        return RSLORA
    return LORA
