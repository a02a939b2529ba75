"""The app factory: the lifespan builds the model, adapters, engine (and RAG) once."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from adapters.base_model import load_base_model, pick_device, resolve_base_model, serving_dtype_for
from adapters.batched_lora import BatchedLoRAModel
from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from rag.collections import CollectionManager
from server.api.adapter_admin.api_router import router as adapter_admin_router
from server.api.auth import Admin, KeyRing
from server.api.chat.api_router import router as chat_router
from server.api.collections.api_router import router as collections_router
from server.api.collections.rag_service import RagService
from server.api.completions.api_router import router as completions_router
from server.api.deps import ServingState
from server.api.embeddings.api_router import router as embeddings_router
from server.api.embeddings.serving import build_embedding_worker
from server.api.errors import install_error_handlers
from server.api.health.api_router import router as health_router
from server.api.limits import RequestLimitsMiddleware
from server.api.models.api_router import router as models_router
from server.api.native.api_router import router as native_router
from server.api.request_context import RequestContextMiddleware
from server.api.responses.api_router import router as responses_router
from server.api.tokenize.api_router import router as tokenize_router
from server.config import Settings
from server.engine.engine import EngineConfig, LLMEngine, eos_ids_for
from server.engine.prefix_cache import PrefixCache
from server.engine.runner import ModelRunner
from server.engine.structured.compiler import GrammarCompiler
from server.engine.threads import limit_threads

logger = logging.getLogger(__name__)


def collection_manager(settings: Settings) -> CollectionManager:
    """The RAG collections under the data dir (opened once per server; under Ray Serve by the RAG
    deployment alone)."""
    return CollectionManager(
        settings.data_dir / "rag",
        default_embedding_model=settings.embedding_model,
        max_upload_bytes=settings.rag_max_upload_bytes,
    )


def build_state(settings: Settings, rag: RagService | None = None) -> ServingState:
    """Loads the base model and wires adapters, registry and engine (the engine is not started).

    Args:
        settings: the server settings.
        rag: what serves the RAG collections; None opens them here (:func:`collection_manager`).
    """
    device = pick_device(settings.device)
    cores = os.cpu_count() or 1
    prefill_worker = settings.prefill_worker == "on" or (
        settings.prefill_worker == "auto" and device.type == "cpu" and cores >= 2
    )
    # Two engine threads compute at once with the prefill worker: half the cores each.
    threads = settings.torch_threads or (max(1, cores // 2) if prefill_worker else cores)
    if device.type == "cpu":
        limit_threads(threads)
    model_dir = resolve_base_model(settings.base_model, settings.cache_dir)
    dtype = serving_dtype_for(device) if settings.dtype == "auto" else getattr(torch, settings.dtype)
    base = load_base_model(model_dir, settings.quantization, settings.device, dtype)
    compute_dtype = next(p for p in base.model.parameters() if p.is_floating_point()).dtype
    lora = BatchedLoRAModel(base.model, compute_dtype)
    store = AdapterStore(settings.adapter_dir)
    registry = AdapterRegistry(store, lora, settings.max_loaded_adapters, settings.max_adapter_rank)
    context_length = min(settings.max_model_len, base.context_length)
    engine = LLMEngine(
        ModelRunner(
            base.model,
            lora,
            base.device,
            cuda_graphs=settings.cuda_graphs == "on",
            prefix_cache=PrefixCache(settings.prefix_cache_bytes),
        ),
        registry,
        base.tokenizer,
        EngineConfig(
            settings.max_batch_size,
            settings.max_prefills_per_step,
            context_length,
            prefill_worker,
            threads if device.type == "cpu" else None,
            prefill_chunk_tokens=settings.prefill_chunk_tokens or None,
            idle_prefill_decode_threads=(
                cores if device.type == "cpu" and prefill_worker and not settings.torch_threads else None
            ),
        ),
        eos_ids_for(base.tokenizer, base.model),
    )
    if rag is None:
        rag = collection_manager(settings)
    grammars = GrammarCompiler(
        base.tokenizer,
        vocab_size=base.model.config.get_text_config().vocab_size,
        eos_token_ids=sorted(engine.eos_token_ids),
    )
    return ServingState(settings, base, store, registry, engine, context_length, rag=rag, grammars=grammars)


def create_app(
    settings: Settings, on_fatal=None, build: Callable[[Settings], ServingState] = build_state
) -> FastAPI:
    """Builds the FastAPI app; heavy objects are created in the lifespan, never at import.

    Args:
        settings: the server settings.
        on_fatal: called (from the engine thread) if the engine loop dies, so that the process can
            exit non-zero and a supervisor restart it.
        build: makes the serving state (model, registry, engine) from the settings; API tests pass
            one that puts a fake engine in.
    """
    keyring = KeyRing.from_file(settings.api_keys_file) if settings.api_keys_file else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = build(settings)
        state.engine.on_fatal = on_fatal
        state.metrics.bind(state)
        state.engine.start()
        app.state.serving = state
        app.state.rag = state.rag
        app.state.embeddings = build_embedding_worker(state)
        logger.info("serving %s with adapters from %s", state.model_id, settings.adapter_dir)
        try:
            yield
        finally:
            state.engine.stop()
            app.state.embeddings.close()
            state.rag.close()  # flushes the collections' indexes (if they are this app's)
            logger.info("engine stopped, RAG collections closed")

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan)
    app.state.keyring = keyring
    install_error_handlers(app)
    app.add_middleware(
        RequestLimitsMiddleware,
        max_body_bytes=settings.max_body_bytes,
        max_upload_bytes=settings.max_upload_bytes,
        max_headers=settings.max_headers,
    )
    app.add_middleware(RequestContextMiddleware, metrics_getter=lambda: _metrics_of(app))
    for router in (
        health_router,
        models_router,
        chat_router,
        completions_router,
        responses_router,
        embeddings_router,
        tokenize_router,
        adapter_admin_router,
        collections_router,
        native_router,
    ):
        app.include_router(router)

    @app.get("/metrics", tags=["health"])
    def metrics(request: Request, _: Admin) -> Response:
        """Prometheus metrics; they name every tenant's adapters, so with keys they need an admin key."""
        state = request.app.state.serving
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _metrics_of(app: FastAPI):
    state = getattr(app.state, "serving", None)
    return state.metrics if state is not None else None
