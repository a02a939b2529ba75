"""The embeddings feature: which model a request names, checking and tokenizing inputs, the response.

The embedder is the RAG pipeline's own (``CollectionManager.embedder``): one copy of the model serves
retrieval and this API, and vectors are exactly what ``SentenceTransformer.encode(...,
normalize_embeddings=True)`` returns — unit vectors, as OpenAI's are.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from starlette.concurrency import run_in_threadpool

from rag.embedder import Embedder, resolve_model_path
from server.api.deps import ServingState
from server.api.embeddings.protocol import EmbeddingRequest
from server.api.embeddings.worker import EmbeddingWorker
from server.api.errors import APIError
from server.config import Settings

logger = logging.getLogger(__name__)


class TokenizingEmbedder(Embedder, Protocol):
    """What this API needs beyond the RAG embedder protocol: its tokenizer both ways."""

    vocab_size: int

    def token_ids(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class EmbeddingBatch:
    """A request's inputs as the texts the model reads, with their token counts."""

    texts: list[str]
    token_counts: list[int]

    @property
    def tokens(self) -> int:
        return sum(self.token_counts)


def embedding_model_names(settings: Settings) -> dict[str, str]:
    """Every name ``model`` may take on /v1/embeddings, mapped to the model's id."""
    model_id = settings.embedding_model_id
    return {model_id: model_id, **settings.embedding_aliases}


def resolve_embedding_model(settings: Settings, name: str) -> str:
    """The embedding model's id for ``name`` (its id or an alias); 404 ``model_not_found`` otherwise."""
    model_id = embedding_model_names(settings).get(name)
    if model_id is None:
        raise APIError(
            404,
            f"The embedding model '{name}' does not exist; this server embeds with "
            f"'{settings.embedding_model_id}'.",
            code="model_not_found",
            param="model",
        )
    return model_id


def embedding_model_entries(state: ServingState) -> list[dict]:
    """The ``/v1/models`` entries of the embedding model and of each of its aliases."""
    settings = state.settings
    created = _model_created(state.rag.default_embedding_model)
    names = embedding_model_names(settings)
    return [embedding_model_entry(name, model_id, created) for name, model_id in names.items()]


def embedding_model_entry(name: str, model_id: str, created: int) -> dict:
    """One model entry; ``type: embedding`` tells it from generation models, ``root`` names the model."""
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "loraplex",
        "parent": None,
        "root": model_id,
        "type": "embedding",
    }


def _model_created(model: str) -> int:
    try:
        return int(os.stat(resolve_model_path(model)).st_mtime)
    except (OSError, ValueError):
        return 0


def build_embedding_worker(state: ServingState) -> EmbeddingWorker:
    """The worker that runs the RAG pipeline's embedder for /v1/embeddings (built in the lifespan)."""
    return EmbeddingWorker(lambda: served_embedder(state), state.settings.max_embedding_queue_tokens)


def served_embedder(state: ServingState) -> TokenizingEmbedder:
    """The shared embedder of the server's embedding model, loaded on first use."""
    return state.rag.embedder(state.rag.default_embedding_model)


def check_request_shape(settings: Settings, body: EmbeddingRequest) -> list[str] | list[list[int]]:
    """The request's inputs, after the checks that need no model: emptiness and the input count."""
    inputs = body.inputs()
    if not inputs:
        raise APIError(400, "input must not be empty", code="invalid_value", param="input")
    limit = settings.max_embedding_inputs
    if len(inputs) > limit:
        raise APIError(
            400,
            f"input has {len(inputs)} items; the limit is {limit} (--max-embedding-inputs)",
            code="too_many_inputs",
            param="input",
        )
    for i, item in enumerate(inputs):
        if len(item) == 0:
            raise APIError(400, f"input[{i}] is empty", code="invalid_value", param="input")
    return inputs


def tokenize_inputs(
    embedder: TokenizingEmbedder,
    settings: Settings,
    model_id: str,
    inputs: list[str] | list[list[int]],
    dimensions: int | None,
) -> EmbeddingBatch:
    """Decodes token-id inputs, counts every input's tokens and applies the length limits.

    Runs in a worker thread (tokenizing 2048 texts would stall the event loop).

    Args:
        embedder: the served embedder.
        settings: the server settings (the limits).
        model_id: the embedding model's id, for messages.
        inputs: texts or token-id lists, as :func:`check_request_shape` returns them.
        dimensions: the request's ``dimensions``; only the model's own is accepted.
    """
    if dimensions is not None and dimensions != embedder.dimension:
        raise APIError(
            400,
            f"dimensions={dimensions} is not supported: {model_id} is not trained for shortened "
            f"(Matryoshka) embeddings; its embeddings have {embedder.dimension} dimensions",
            code="invalid_value",
            param="dimensions",
        )
    texts = [_as_text(embedder, item) for item in inputs]
    token_counts = []
    for i, text in enumerate(texts):
        count = len(embedder.token_ids(text))
        if count > embedder.max_tokens:
            raise APIError(
                400,
                f"input[{i}] has {count} tokens; {model_id} reads at most {embedder.max_tokens} "
                "(inputs are not truncated: shorten or split them)",
                code="context_length_exceeded",
                param="input",
            )
        token_counts.append(count)
    batch = EmbeddingBatch(texts, token_counts)
    if batch.tokens > settings.max_embedding_tokens:
        raise APIError(
            400,
            f"input has {batch.tokens} tokens in all; the limit is {settings.max_embedding_tokens} "
            "per request (--max-embedding-tokens)",
            code="too_many_tokens",
            param="input",
        )
    return batch


def _as_text(embedder: TokenizingEmbedder, item: str | list[int]) -> str:
    if isinstance(item, str):
        return item
    bad = next((t for t in item if not 0 <= t < embedder.vocab_size), None)
    if bad is not None:
        raise APIError(
            400,
            f"token id {bad} is outside the embedding model's vocabulary [0, {embedder.vocab_size})",
            code="invalid_value",
            param="input",
        )
    text = embedder.decode(item)
    if not text:
        raise APIError(400, "token ids that decode to no text (special tokens only)", param="input")
    return text


async def create_embeddings(state: ServingState, worker: EmbeddingWorker, body: EmbeddingRequest) -> dict:
    """The OpenAI embeddings response for ``body``; the model runs in the worker thread."""
    settings = state.settings
    model_id = resolve_embedding_model(settings, body.model)
    inputs = check_request_shape(settings, body)  # cheap refusals before the model is (lazily) loaded
    embedder = await run_in_threadpool(served_embedder, state)
    batch = await run_in_threadpool(tokenize_inputs, embedder, settings, model_id, inputs, body.dimensions)
    started = time.perf_counter()
    vectors = await asyncio.wrap_future(worker.submit(batch.texts, batch.tokens))  # (N, d) float32
    logger.debug("embedded %d inputs in %.1f ms", len(batch.texts), (time.perf_counter() - started) * 1e3)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encoded(vector, body.encoding_format)}
            for i, vector in enumerate(vectors)
        ],
        "model": model_id,
        "usage": {"prompt_tokens": batch.tokens, "total_tokens": batch.tokens},
    }


def _encoded(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # OpenAI's: the raw little-endian float32 bytes
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
