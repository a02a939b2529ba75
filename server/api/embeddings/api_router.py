"""``POST /v1/embeddings``: thin; parse, authenticate, call serving."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from server.api.auth import Caller
from server.api.deps import State
from server.api.embeddings.protocol import EmbeddingRequest, EmbeddingResponse
from server.api.embeddings.serving import create_embeddings
from server.api.embeddings.worker import EmbeddingWorker

router = APIRouter(tags=["openai"])


def get_embedding_worker(request: Request) -> EmbeddingWorker:
    return request.app.state.embeddings


Worker = Annotated[EmbeddingWorker, Depends(get_embedding_worker)]


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def embeddings(body: EmbeddingRequest, state: State, worker: Worker, _: Caller) -> JSONResponse:
    # A JSONResponse skips re-validating thousands of floats through the response model (docs only).
    return JSONResponse(await create_embeddings(state, worker, body))
