"""``POST /v1/completions``: parse, authenticate, hand to the serving layer."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.api.auth import Caller
from server.api.completions.protocol import CompletionRequest
from server.api.completions.serving import create_completion
from server.api.deps import State

router = APIRouter(tags=["openai"])


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: State, caller: Caller):
    return await create_completion(state, body, request, caller)
