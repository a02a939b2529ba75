"""``GET /v1/models``: the base model and every adapter or cached merge the caller may use."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.auth import Caller, may_see_adapter
from server.api.deps import State

router = APIRouter(tags=["openai"])


@router.get("/v1/models")
def list_models(state: State, caller: Caller) -> dict:
    created = int(state.base.path.stat().st_mtime) if state.base.path.exists() else 0
    data = [
        {"id": state.model_id, "object": "model", "created": created, "owned_by": "loraplex", "parent": None}
    ]
    names = set(state.store.names()) | {r.name for r in state.registry.resident()}
    for name in sorted(n for n in names if may_see_adapter(state, caller, n)):
        entry = {"id": name, "object": "model", "created": created, "owned_by": "loraplex"}
        data.append({**entry, "parent": state.model_id})
    return {"object": "list", "data": data}
