"""``POST /v1/chat/completions``: parse, authenticate, hand to the serving layer."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.api.auth import Caller
from server.api.chat.protocol import ChatCompletionRequest
from server.api.chat.serving import create_chat_completion
from server.api.deps import State

router = APIRouter(tags=["openai"])


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State, caller: Caller):
    return await create_chat_completion(state, body, request, caller)
