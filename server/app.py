"""The app factory: the lifespan builds the model, adapters, engine (and RAG) once."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from adapters.base_model import load_base_model, resolve_base_model
from adapters.batched_lora import BatchedLoRAModel
from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from server.api import routes_adapters, routes_health, routes_openai
from server.api.deps import ServingState
from server.api.errors import install_error_handlers
from server.config import Settings
from server.engine.engine import EngineConfig, LLMEngine, eos_ids_for
from server.engine.runner import ModelRunner

logger = logging.getLogger(__name__)


def build_state(settings: Settings) -> ServingState:
    """Loads the base model and wires adapters, registry and engine (the engine is not started)."""
    model_dir = resolve_base_model(settings.base_model, settings.cache_dir)
    base = load_base_model(model_dir, settings.quantization, settings.device)
    compute_dtype = next(p for p in base.model.parameters() if p.is_floating_point()).dtype
    lora = BatchedLoRAModel(base.model, compute_dtype)
    store = AdapterStore(settings.adapter_dir)
    registry = AdapterRegistry(store, lora, settings.max_loaded_adapters, settings.max_adapter_rank)
    context_length = min(settings.max_model_len, base.context_length)
    engine = LLMEngine(
        ModelRunner(base.model, lora, base.device),
        registry,
        base.tokenizer,
        EngineConfig(settings.max_batch_size, settings.max_prefills_per_step, context_length),
        eos_ids_for(base.tokenizer, base.model),
    )
    return ServingState(settings, base, store, registry, engine, context_length)


def create_app(settings: Settings) -> FastAPI:
    """Builds the FastAPI app; heavy objects are created in the lifespan, never at import."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = build_state(settings)
        state.engine.start()
        app.state.serving = state
        logger.info("serving %s with adapters from %s", state.model_id, settings.adapter_dir)
        try:
            yield
        finally:
            state.engine.stop()

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(routes_health.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_adapters.router)
    return app
