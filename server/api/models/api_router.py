"""``GET /v1/models`` and ``GET /v1/models/{id}``: thin; authenticate, call serving."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.auth import Caller
from server.api.deps import State
from server.api.models.serving import list_models, retrieve_model

router = APIRouter(tags=["openai"])


@router.get("/v1/models")
def get_models(state: State, caller: Caller) -> dict:
    return list_models(state, caller)


# ``:path`` because an embedding alias may contain '/' (e.g. sentence-transformers/all-MiniLM-L6-v2).
@router.get("/v1/models/{model_id:path}")
def get_model(model_id: str, state: State, caller: Caller) -> dict:
    return retrieve_model(state, caller, model_id)
