"""The RAG deployment (one replica): the only process that opens the RAG collections.

A FAISS index and its SQLite store have one writer, so creations, ingests and deletions from every
engine replica come here (through :class:`server.ray.rag_client.RemoteCollections`), as do searches:
a write is visible to every replica's next search at once. Errors are the ``rag.errors``
exceptions, which pickle intact; the engine replica that called maps them to HTTP.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.concurrency import run_in_threadpool

from rag.collections import CollectionManager
from server.api.collections.rag_service import COLLECTION_CALLS
from server.app import collection_manager
from server.config import Settings

logger = logging.getLogger(__name__)

RAG_DEPLOYMENT = "RagCollections"  # the deployment's name in the Serve application


def call_manager(manager: CollectionManager, method: str, args: tuple, kwargs: dict) -> Any:
    """Runs one collection call (only :data:`COLLECTION_CALLS`) on ``manager``."""
    if method not in COLLECTION_CALLS:
        raise AttributeError(f"{method!r} is not a collection call")
    return getattr(manager, method)(*args, **kwargs)


class RagReplica:
    """The body of the RAG deployment (``server.ray.app`` wraps it in ``serve.deployment``)."""

    def __init__(self, settings: Settings):
        self.manager = collection_manager(settings)
        logger.info("RAG collections under %s opened", self.manager.root)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """One collection call from an engine replica (blocking work runs in the thread pool)."""
        return await run_in_threadpool(call_manager, self.manager, method, args, kwargs)

    def __del__(self) -> None:
        manager = getattr(self, "manager", None)  # None: __init__ failed
        if manager is not None:
            manager.close()  # flushes the collections' indexes
