"""Which models a caller may see, and their entries (the same shape as the ``/v1/models`` list).

A name the caller may not use gets exactly the 404 of a name that does not exist, so retrieving a model
tells a tenant nothing about another tenant's adapters.
"""

from __future__ import annotations

from adapters.merging import MergeSpec
from adapters.registry import ResidentAdapter
from adapters.store import ADAPTER_NAME_RE, MERGED_PREFIX
from server.api.auth import Principal
from server.api.deps import ServingState
from server.api.embeddings.serving import embedding_model_entries
from server.api.errors import APIError


def base_created(state: ServingState) -> int:
    """The ``created`` time of the base model and its adapters (as the list reports it)."""
    return int(state.base.path.stat().st_mtime) if state.base.path.exists() else 0


def base_entry(state: ServingState) -> dict:
    return {
        "id": state.model_id,
        "object": "model",
        "created": base_created(state),
        "owned_by": "loraplex",
        "parent": None,
    }


def adapter_entry(state: ServingState, name: str) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": base_created(state),
        "owned_by": "loraplex",
        "parent": state.model_id,
    }


def merge_parts(resident: ResidentAdapter) -> tuple[str, ...]:
    """The adapters a cached merge was computed from (from its spec if the registry kept no parts)."""
    if resident.parts:
        return resident.parts
    if resident.spec:
        return tuple(name for name, _ in MergeSpec.from_request(resident.spec).parts)
    return ()


def adapter_visible(state: ServingState, caller: Principal, name: str) -> bool:
    """Whether ``name`` is a stored adapter or a cached merge the caller may use.

    A cached merge (``merge-<hash>``) is visible only if every one of its parts is; one whose parts are
    unknown only to admins.
    """
    if not ADAPTER_NAME_RE.fullmatch(name):
        return False
    resident = state.registry.get(name) if name.startswith(MERGED_PREFIX) else None
    if resident is not None and resident.origin == "merge":
        parts = merge_parts(resident)
        if not parts:
            return caller.is_admin
        return all(adapter_visible(state, caller, part) for part in parts)
    if not caller.may_use_adapter(name):
        return False
    return state.store.exists(name) or state.registry.is_loaded(name)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist.", code="model_not_found", param="model")


def retrieve_model(state: ServingState, caller: Principal, model_id: str) -> dict:
    """The entry of ``model_id``: the base model, the embedder or an alias, or a visible adapter."""
    if model_id == state.model_id:
        return base_entry(state)
    for entry in embedding_model_entries(state):
        if entry["id"] == model_id:
            return entry
    if adapter_visible(state, caller, model_id):
        return adapter_entry(state, model_id)
    raise model_not_found(model_id)
