"""A real app (real engine, tiny model) behind FastAPI's TestClient."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings


def tiny_settings(tiny_base_dir, adapter_store_dir, tmp_path, **overrides) -> Settings:
    values = dict(
        base_model=str(tiny_base_dir),
        quantization="none",
        device="cpu",
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
