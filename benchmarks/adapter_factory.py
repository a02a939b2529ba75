"""Random-weight PEFT LoRA adapters written straight to safetensors (no model load: milliseconds each)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_ONLY = ("q_proj", "v_proj")


def linear_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """``{module short name: (in_features, out_features)}`` of a Llama-style model from its config."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    return {
        "q_proj": (hidden, config["num_attention_heads"] * head_dim),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (config["num_attention_heads"] * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def module_path(layer: int, short: str) -> str:
    block = "mlp" if short in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"model.layers.{layer}.{block}.{short}"


def write_random_adapter(
    model_dir: Path, out_dir: Path, rank: int, target_modules: tuple[str, ...], seed: int
) -> Path:
    """Writes a PEFT-format LoRA (``adapter_config.json`` + ``adapter_model.safetensors``) into ``out_dir``.

    B is random too (PEFT initialises it to zero), so the adapter really changes the output.
    """
    config = json.loads((model_dir / "config.json").read_text())
    shapes = linear_shapes(model_dir)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(config["num_hidden_layers"]):
        for short in target_modules:
            in_f, out_f = shapes[short]
            prefix = f"base_model.model.{module_path(layer, short)}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) / in_f**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.01
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(target_modules),
        "bias": "none",
        "base_model_name_or_path": str(model_dir),
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out_dir


def adapter_mix(i: int) -> tuple[int, tuple[str, ...]]:
    """The ``i``-th adapter's rank and targets: ranks 8 and 16, all-linear and attention-only, mixed."""
    rank = 8 if i % 2 == 0 else 16
    targets = ALL_LINEAR if (i // 2) % 2 == 0 else ATTENTION_ONLY
    return rank, targets
