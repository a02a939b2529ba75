"""Shared fixtures: a tiny base model and random adapters, built once per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors only in Triton's interpreter, chosen when a kernel is defined:
    # set before anything imports adapters/kernels/triton_lora.py (tests/adapters/test_triton_lora.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.tiny_models import (
    save_random_adapter,
    save_random_ia3_adapter,
    save_random_prefix_tuning_adapter,
    save_random_prompt_tuning_adapter,
    save_tiny_base,
)

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# name -> (rank, alpha, target modules, seed): different ranks, alphas and module sets on purpose.
TINY_ADAPTERS = {
    "attn-r4": (4, 8.0, ("q_proj", "v_proj"), 1),
    "all-r8": (8, 16.0, ALL_LINEAR, 2),
    "mlp-r2": (2, 4.0, ("gate_proj", "up_proj", "down_proj"), 3),
}


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_adapter_sources(tiny_base_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-adapters")
    return {
        name: save_random_adapter(tiny_base_dir, root / name, rank, alpha, modules, seed)
        for name, (rank, alpha, modules, seed) in TINY_ADAPTERS.items()
    }


@pytest.fixture
def adapter_store_dir(tmp_path, tiny_adapter_sources) -> Path:
    """A fresh adapter store holding copies of the tiny adapters."""
    return copy_adapter_store(tmp_path / "adapters", tiny_adapter_sources)


def copy_adapter_store(store: Path, sources: dict[str, Path]) -> Path:
    """A new adapter store at ``store`` holding copies of ``sources`` (name -> adapter folder)."""
    store.mkdir()
    for name, src in sources.items():
        shutil.copytree(src, store / name)
    return store


# name -> LoraConfig options: one adapter of each servable type (IA³ is built by its own helper).
PEFT_TYPE_ADAPTERS = {
    "rslora-patterns": dict(
        rank=4,
        alpha=8.0,
        target_modules=ALL_LINEAR,
        seed=11,
        use_rslora=True,
        rank_pattern={"k_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 3.0, "gate_proj": 12.0},
    ),
    "dora": dict(rank=4, alpha=8.0, target_modules=ALL_LINEAR, seed=12, use_dora=True),
    "dora-rslora": dict(
        rank=8,
        alpha=4.0,
        target_modules=("q_proj", "o_proj", "up_proj"),
        seed=13,
        use_dora=True,
        use_rslora=True,
        rank_pattern={"o_proj": 2},
    ),
}


@pytest.fixture(scope="session")
def peft_type_sources(tiny_base_dir, tmp_path_factory) -> dict[str, Path]:
    """One tiny adapter per servable PEFT type: rsLoRA with rank/alpha patterns, DoRA (plain and
    rsLoRA), IA³ (feedforward input scaling and output scaling in one adapter), prompt tuning, prefix
    tuning (plain, and with PEFT's ``prefix_projection`` MLP)."""
    root = tmp_path_factory.mktemp("peft-types")
    sources = {
        name: save_random_adapter(tiny_base_dir, root / name, **kw) for name, kw in PEFT_TYPE_ADAPTERS.items()
    }
    sources["ia3"] = save_random_ia3_adapter(tiny_base_dir, root / "ia3", seed=14)
    sources["prompt-tuning"] = save_random_prompt_tuning_adapter(
        tiny_base_dir, root / "prompt-tuning", seed=15
    )
    sources["prefix-tuning"] = save_random_prefix_tuning_adapter(
        tiny_base_dir, root / "prefix-tuning", seed=16
    )
    sources["prefix-projection"] = save_random_prefix_tuning_adapter(
        tiny_base_dir, root / "prefix-projection", seed=17, prefix_projection=True
    )
    return sources


@pytest.fixture
def peft_type_store_dir(tmp_path, tiny_adapter_sources, peft_type_sources) -> Path:
    """A fresh store holding the tiny LoRA adapters and one adapter of each PEFT type."""
    store = tmp_path / "adapters"
    store.mkdir()
    for name, src in {**tiny_adapter_sources, **peft_type_sources}.items():
        shutil.copytree(src, store / name)
    return store


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` need a CUDA device (``make gpu-check`` runs them); skipped without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run by `make gpu-check` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
