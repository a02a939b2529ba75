"""Fixtures for the training tests: the session's tiny Llama (tests/tiny_models.py), loaded as a base."""

from __future__ import annotations

import pytest


@pytest.fixture
def tiny_base(tiny_base_dir):
    """A fresh load for each test (training injects LoRA layers into the model)."""
    from adapters.base_model import load_base_model

    return load_base_model(tiny_base_dir, quantization="none", device="cpu")


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The tiny model gains nothing from threads, and on a shared 2-core box they only contend."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
