"""What the routes need from the running app, as FastAPI dependencies."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from adapters.base_model import BaseModel
from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from server.api.limits import RateLimiter
from server.config import Settings
from server.engine.protocol import Engine
from server.metrics import ServerMetrics


@dataclass
class ServingState:
    """The heavy objects built once in the app's lifespan."""

    settings: Settings
    base: BaseModel
    store: AdapterStore
    registry: AdapterRegistry
    engine: Engine
    context_length: int
    rag: Any = None  # server.api.collections.rag_service.RagService, when RAG is enabled
    grammars: Any = None  # server.engine.structured.GrammarCompiler: structured outputs
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    rate_limiter: RateLimiter = field(default_factory=RateLimiter)
    pending: int = 0  # sequences admitted by the API and not finished (bounded by max_pending)
    pending_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def model_id(self) -> str:
        return self.base.model_id


def get_state(request: Request) -> ServingState:
    return request.app.state.serving


State = Annotated[ServingState, Depends(get_state)]
