"""Which models a caller may see, and their entries (the same shape as the ``/v1/models`` list).

A name the caller may not use gets exactly the 404 of a name that does not exist, so retrieving a model
tells a tenant nothing about another tenant's adapters.
"""

from __future__ import annotations

from adapters.store import ADAPTER_NAME_RE
from server.api.auth import Principal, may_see_adapter
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


def adapter_visible(state: ServingState, caller: Principal, name: str) -> bool:
    """Whether ``name`` is a stored adapter or a cached merge the caller may use (a merge only if
    every part is: :func:`server.api.auth.may_see_adapter`)."""
    if not ADAPTER_NAME_RE.fullmatch(name) or not may_see_adapter(state, caller, name):
        return False
    return state.store.exists(name) or state.registry.is_loaded(name)


def list_models(state: ServingState, caller: Principal) -> dict:
    """The base model, every adapter and cached merge the caller may use, and the embedder."""
    names = set(state.store.names()) | {r.name for r in state.registry.resident()}
    adapters = [adapter_entry(state, n) for n in sorted(names) if may_see_adapter(state, caller, n)]
    return {"object": "list", "data": [base_entry(state), *adapters, *embedding_model_entries(state)]}


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
