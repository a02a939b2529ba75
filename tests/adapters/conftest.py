"""Tiny Llama models and random PEFT adapters for the adapter tests (built in the test, never downloaded)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (rank, alpha, target modules): equal and unequal ranks, full and partial overlaps.
TINY_ADAPTERS = {
    "a": (4, 8, ALL_LINEARS),
    "b": (4, 16, ALL_LINEARS),
    "c": (4, 4, ["q_proj", "v_proj", "down_proj"]),
    "d": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]),
}


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def build_tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def linear_shapes_of(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Module name -> (in_features, out_features) of every linear layer but the LM head."""
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not name.endswith("lm_head")
    }


def save_random_adapter(folder: Path, rank: int, alpha: float, targets: list[str], seed: int) -> Path:
    """A PEFT LoRA adapter with random A and B (``init_lora_weights=False``), saved to ``folder``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM"
    )
    torch.manual_seed(seed)
    model = get_peft_model(build_tiny_llama(), config)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The folders of :data:`TINY_ADAPTERS`, saved once per test session."""
    store = tmp_path_factory.mktemp("adapter-store")
    return {
        name: save_random_adapter(store / name, rank, alpha, targets, seed=100 + i)
        for i, (name, (rank, alpha, targets)) in enumerate(TINY_ADAPTERS.items())
    }


@pytest.fixture(scope="session")
def tiny_linear_shapes() -> dict[str, tuple[int, int]]:
    return linear_shapes_of(build_tiny_llama())


@pytest.fixture(scope="session")
def tiny_llama() -> Callable[[int], LlamaForCausalLM]:
    """A factory of fresh tiny Llama models (same seed, same weights)."""
    return build_tiny_llama
