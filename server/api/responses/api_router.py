"""``POST /v1/responses``: parse, authenticate, hand to the serving layer."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.api.auth import Caller
from server.api.deps import State
from server.api.responses.protocol import ResponsesRequest
from server.api.responses.serving import create_response

router = APIRouter(tags=["openai"])


@router.post("/v1/responses")
async def responses(body: ResponsesRequest, request: Request, state: State, caller: Caller):
    return await create_response(state, body, request, caller)
