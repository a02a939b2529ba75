"""Fixtures of the engine tests that run the tiny model with real adapters."""

from __future__ import annotations

import pytest
import torch

from adapters.base_model import load_base_model
from adapters.batched_lora import BatchedLoRAModel
from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore


@pytest.fixture
def served(tiny_base_dir, peft_type_store_dir):
    """The tiny base in fp32, its batched-LoRA wrapper, and a registry over one adapter of each type."""
    base = load_base_model(tiny_base_dir, "none", "cpu", dtype=torch.float32)
    lora = BatchedLoRAModel(base.model, torch.float32)
    registry = AdapterRegistry(AdapterStore(peft_type_store_dir), lora, max_loaded=8, max_rank=64)
    return base, lora, registry
