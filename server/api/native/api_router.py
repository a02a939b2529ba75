"""LoRAX's and TGI's native routes: parse, authenticate, hand to the serving layer.

Every error on these routes, authentication and body validation included, is in TGI's shape
(:mod:`server.api.native.errors`), which the ``lorax`` and ``text_generation`` clients parse.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.api.auth import Caller
from server.api.deps import State
from server.api.errors import APIError
from server.api.native.errors import NativeErrorRoute
from server.api.native.protocol import GenerateRequest
from server.api.native.serving import create_generation, server_info

router = APIRouter(tags=["native"], route_class=NativeErrorRoute)


def _check_stream(body: GenerateRequest, stream: bool, route: str) -> None:
    """``stream`` in the body may only agree with a route that fixes the answer's form."""
    if "stream" in body.model_fields_set and body.stream != stream:
        message = f"{route} does not take stream={str(body.stream).lower()}; use POST / to choose"
        raise APIError(400, message, param="stream")


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request, state: State, caller: Caller):
    """TGI's ``generate``: one ``{"generated_text", "details"}`` body."""
    _check_stream(body, False, "/generate")
    return await create_generation(state, body, request, caller, stream=False)


@router.post("/generate_stream")
async def generate_stream(body: GenerateRequest, request: Request, state: State, caller: Caller):
    """TGI's ``generate_stream``: SSE token events, the last with ``generated_text``."""
    _check_stream(body, True, "/generate_stream")
    return await create_generation(state, body, request, caller, stream=True)


@router.post("/")
async def compat_generate(body: GenerateRequest, request: Request, state: State, caller: Caller):
    """TGI's compatibility route (what both clients call): ``stream`` picks SSE or ``[body]``."""
    return await create_generation(state, body, request, caller, stream=body.stream, as_list=True)


@router.get("/info")
def info(request: Request, state: State, _: Caller) -> dict:
    """The model, its limits and where adapters come from."""
    return server_info(state, request.app.version)
