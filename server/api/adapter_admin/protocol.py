"""Wire models of the adapter admin routes (ours and vLLM's)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class SaveMergeRequest(BaseModel):
    """``POST /v1/adapters/{name}/save``: persist a merge spec as a named adapter."""

    model_config = ConfigDict(extra="forbid")

    merge: list[dict[str, Any]] | None = None
    method: str | None = None
    density: float | None = None
    majority_sign_method: str | None = None
    merged_adapters: dict[str, Any] | None = None
    overwrite: bool = False


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's ``/v1/load_lora_adapter`` body."""

    lora_name: str
    lora_path: str | None = None


class UnloadLoraAdapterRequest(BaseModel):
    lora_name: str
