"""Adapter administration: list, load, unload, upload, delete (plus vLLM's load/unload routes)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, File, Query, UploadFile
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from adapters.errors import AdapterNotFound
from adapters.lease import AdapterChoice
from adapters.lora import load_lora_weights, save_lora_weights
from adapters.merging import MergeSpec
from adapters.safe_files import MAX_CONFIG_BYTES
from adapters.store import CONFIG_FILE, WEIGHTS_FILE, check_adapter_name
from server.api.adapter_admin.protocol import (
    LoadLoraAdapterRequest,
    SaveMergeRequest,
    UnloadLoraAdapterRequest,
)
from server.api.auth import Admin, Caller, may_see_adapter
from server.api.deps import ServingState, State
from server.api.errors import APIError

router = APIRouter(tags=["adapters"])


def describe(state: ServingState, name: str) -> dict:
    info = state.store.describe(name)
    resident = state.registry.get(name)
    entry = {
        "name": name,
        "status": "loaded" if resident else "on_disk",
        "peft_type": info.peft_type,
        "rank": info.rank,
        "alpha": info.alpha,
        "target_modules": info.target_modules,
        "size_bytes": info.size_bytes,
        "base_model": Path(info.base_model).name if info.base_model else None,
        "slot": resident.slot if resident else None,
        "requests_in_flight": resident.pins if resident else 0,
    }
    summary = (info.card or {}).get("summary")
    if isinstance(summary, dict):  # written by training/ (training_card.json)
        entry["training"] = summary
        card_hash = summary.get("base_weights_sha256")
        if card_hash and card_hash != state.base.weights_sha256:
            entry["warning"] = "trained on a different base model (weights hash differs from the loaded base)"
    return entry


@router.get("/v1/adapters")
def list_adapters(state: State, caller: Caller) -> dict:
    data = [describe(state, name) for name in state.store.names() if caller.may_use_adapter(name)]
    for resident in state.registry.resident():
        if resident.origin != "store" and may_see_adapter(state, caller, resident.name):
            data.append(
                {
                    "name": resident.name,
                    "status": "loaded",
                    "origin": resident.origin,
                    "spec": resident.spec,
                    "peft_type": resident.weights.peft_type,
                    "rank": resident.weights.rank,
                    "slot": resident.slot,
                    "requests_in_flight": resident.pins,
                }
            )
    return {"object": "list", "data": data}


@router.post("/v1/adapters/{name}/load")
async def load_adapter(name: str, state: State, _: Admin) -> dict:
    resident = await run_in_threadpool(state.registry.load, name)
    return {
        "name": name,
        "status": "loaded",
        "slot": resident.slot,
        "load_ms": round(resident.load_seconds * 1e3, 2),
    }


@router.post("/v1/adapters/{name}/unload")
async def unload_adapter(name: str, state: State, _: Admin) -> dict:
    check_adapter_name(name)
    was_loaded = await run_in_threadpool(state.registry.unload, name)
    if not was_loaded and not state.store.exists(name):
        raise AdapterNotFound(name)
    return {"name": name, "status": "on_disk", "unloaded": was_loaded}


@router.put("/v1/adapters/{name}", status_code=201)
async def upload_adapter(
    name: str,
    state: State,
    _: Admin,
    adapter_config: UploadFile = File(..., description=CONFIG_FILE),
    adapter_model: UploadFile = File(..., description=WEIGHTS_FILE),
    overwrite: bool = Query(False),
) -> dict:
    """Stores an adapter from its two files after validating it against the base model."""
    check_adapter_name(name)
    config_bytes = await _read_limited(adapter_config, MAX_CONFIG_BYTES, "adapter_config")
    weights_bytes = await _read_limited(adapter_model, state.settings.max_upload_bytes, "adapter_model")

    def write(folder: Path) -> None:
        (folder / CONFIG_FILE).write_bytes(config_bytes)
        (folder / WEIGHTS_FILE).write_bytes(weights_bytes)

    await run_in_threadpool(_store_validated, state, name, write, overwrite)
    return describe(state, name)


async def _read_limited(upload: UploadFile, limit: int, param: str) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise APIError(413, f"{param} must be at most {limit} bytes", code="upload_too_large", param=param)
    return data


def _store_validated(state: ServingState, name: str, write: Callable[[Path], None], overwrite: bool) -> None:
    """Writes an adapter into a staging folder, validates it as the server would load it, and only
    then renames it into the store (dropping any resident copy it replaces)."""
    registry = state.registry
    staged = state.store.staging_dir(name)
    try:
        write(staged)
        load_lora_weights(
            name,
            staged,
            registry.lora.linear_shapes,
            registry.max_rank,
            attention=registry.lora.attention_shape,
        )
        if overwrite:
            registry.forget(name)
        state.store.commit_staged(staged, name, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


@router.delete("/v1/adapters/{name}")
async def delete_adapter(name: str, state: State, _: Admin) -> dict:
    state.store.require(name)
    await run_in_threadpool(state.registry.forget, name)
    await run_in_threadpool(state.store.delete, name)
    return {"name": name, "deleted": True}


@router.post("/v1/adapters/{name}/save", status_code=201)
async def save_merge(name: str, body: SaveMergeRequest, state: State, caller: Admin) -> dict:
    """Persists a merge spec as a normal named adapter in the store."""
    check_adapter_name(name)
    max_parts = state.settings.max_merge_parts
    if body.merged_adapters is not None:
        spec = MergeSpec.from_lorax(body.merged_adapters, max_parts=max_parts)
    else:
        fields = body.model_dump(exclude={"overwrite", "merged_adapters"}, exclude_none=True)
        spec = MergeSpec.from_request(fields, max_parts=max_parts)
    for i, (part, _) in enumerate(spec.parts):
        if not state.store.exists(part):
            err = AdapterNotFound(part)
            err.param = f"merge[{i}].name"
            raise err
    await run_in_threadpool(_save_merge, state, name, spec, body.overwrite)
    return {**describe(state, name), "spec": spec.to_dict()}


def _save_merge(state: ServingState, name: str, spec: MergeSpec, overwrite: bool) -> None:
    merged = state.registry.merged_weights(AdapterChoice(name, spec), name)
    _store_validated(state, name, lambda folder: save_lora_weights(merged, folder, state.model_id), overwrite)


# ---------------------------------------------------------------- vLLM compatibility
@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def vllm_load(body: LoadLoraAdapterRequest, state: State, _: Admin) -> str:
    name = check_adapter_name(body.lora_name)
    if body.lora_path:
        expected = state.store.path_for(name).resolve()
        given = Path(body.lora_path)
        if not given.is_absolute():
            given = state.store.root / given
        if given.resolve() != expected:
            raise APIError(
                400,
                "lora_path must be the folder named lora_name inside the server's adapter store",
                code="invalid_lora_path",
                param="lora_path",
            )
    await run_in_threadpool(state.registry.load, name)
    return f"Success: LoRA adapter '{name}' added successfully."


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def vllm_unload(body: UnloadLoraAdapterRequest, state: State, _: Admin) -> str:
    name = check_adapter_name(body.lora_name)
    if not await run_in_threadpool(state.registry.unload, name):
        raise AdapterNotFound(name)
    return f"Success: LoRA adapter '{name}' removed successfully."
