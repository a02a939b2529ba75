"""``POST /tokenize`` and ``POST /detokenize``: thin; parse, authenticate, call serving."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.auth import Caller
from server.api.deps import State
from server.api.tokenize import serving
from server.api.tokenize.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter(tags=["tokenize"])


@router.post("/tokenize", response_model=TokenizeResponse)
def tokenize(body: TokenizeRequest, state: State, caller: Caller) -> dict:
    return serving.tokenize(state, caller, body)


@router.post("/detokenize", response_model=DetokenizeResponse)
def detokenize(body: DetokenizeRequest, state: State, caller: Caller) -> dict:
    return serving.detokenize(state, caller, body)
