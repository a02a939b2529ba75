"""A real app (real engine, tiny model) behind FastAPI's TestClient."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from tests.conftest import copy_adapter_store


def tiny_settings(tiny_base_dir, adapter_store_dir, tmp_path, **overrides) -> Settings:
    values = dict(
        base_model=str(tiny_base_dir),
        quantization="none",
        device="cpu",
        # float32 whatever the CPU: "auto" is bfloat16 on CPUs with native bf16 (AVX512-BF16, AMX), where a
        # prefix-cache hit's logits differ from a cold prefill's by bf16 rounding (up to ~3e-2 in logprob on
        # the tiny model) and greedy outputs compared across cache states flip on near-ties.
        dtype="float32",
        data_dir=tmp_path / "data",
        adapter_dir=adapter_store_dir,
        cache_dir=tmp_path / "cache",
        max_loaded_adapters=2,
        max_model_len=256,
        default_max_tokens=16,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def client(tiny_base_dir, adapter_store_dir, tmp_path):
    app = create_app(tiny_settings(tiny_base_dir, adapter_store_dir, tmp_path))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@contextmanager
def shared_client(tmp_path_factory, tiny_base_dir, tiny_adapter_sources, name: str, **overrides) -> Iterator:
    """One app (its own store of the tiny adapters) for a whole module: for fuzz and table tests that
    send many requests to the same engine. ``overrides`` are settings, as for :func:`tiny_settings`."""
    tmp = tmp_path_factory.mktemp(name)
    store = copy_adapter_store(tmp / "adapters", tiny_adapter_sources)
    app = create_app(tiny_settings(tiny_base_dir, store, tmp, **overrides))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


LONG_CONTEXT = 8192


@pytest.fixture
def long_context_client(tiny_base_dir, adapter_store_dir, tmp_path):
    """The fake-engine app with a context long enough for the tool format's system text (the fake
    engine runs no model, so the tiny model's 256 positions do not bind it)."""
    from tests.server.fake_engine import fake_engine_state

    def build(settings: Settings):
        state = fake_engine_state()(settings)
        state.context_length = LONG_CONTEXT
        return state

    settings = tiny_settings(tiny_base_dir, adapter_store_dir, tmp_path, max_tokens_limit=LONG_CONTEXT)
    with TestClient(create_app(settings, build=build)) as test_client:
        yield test_client
