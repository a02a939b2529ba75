"""Shared fixtures: a tiny base model and random adapters, built once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.tiny_models import save_random_adapter, save_tiny_base

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
    store = tmp_path / "adapters"
    store.mkdir()
    for name, src in tiny_adapter_sources.items():
        shutil.copytree(src, store / name)
    return store
