"""How an engine replica reaches the RAG deployment: the serving state's ``rag`` under Ray Serve.

:class:`RemoteCollections` has the methods of :class:`server.api.collections.rag_service.RagService`;
each collection call becomes one call to the RAG deployment's handle, made from the route's worker
thread (routes run ``rag`` calls in the thread pool, so the blocking ``result()`` never runs on the
event loop). What the RAG library raised there is raised here (Ray wraps it in a ``RayTaskError``),
so it maps to the same HTTP error as under ``loraplex serve``; an unreachable deployment is a 503.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from rag.embedder import Embedder, EmbedderCache, canonical_model_name, load_embedder
from server.api.collections.rag_service import COLLECTION_CALLS, RagUnavailable
from server.config import Settings

logger = logging.getLogger(__name__)


def local_error(error: BaseException) -> BaseException:
    """The error to raise in the engine replica for a failed call to the RAG deployment.

    A ``RayTaskError`` (what the deployment raised, carried as its ``cause``) gives back the cause; a
    dead, unreachable or overloaded deployment gives :class:`RagUnavailable`; anything else is
    returned as it is (a 500).
    """
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.exceptions import RayServeException

    if isinstance(error, RayTaskError):
        return local_error(error.cause)  # the cause may itself be Ray's (a replica that died)
    if isinstance(error, (RayActorError, RayServeException)):
        return RagUnavailable()
    return error


class RemoteCollections:
    """The RAG deployment's collections, called through its deployment handle.

    Args:
        handle: the RAG deployment's handle (``server.ray.rag_replica.RagReplica``).
        settings: the server settings (the upload bound and the default embedding model).
        load_embedder: builds the embedders of this replica's ``/v1/embeddings``.
    """

    def __init__(
        self, handle: Any, settings: Settings, load_embedder: Callable[[str], Embedder] = load_embedder
    ):
        self._handle = handle
        self.max_upload_bytes = settings.rag_max_upload_bytes
        self.default_embedding_model = canonical_model_name(settings.embedding_model)
        self._embedders = EmbedderCache(load_embedder)

    def embedder(self, model: str) -> Embedder:
        """An embedder in this replica (``/v1/embeddings``): embedding changes nothing, so it needs
        no single owner."""
        return self._embedders.get(model)

    def close(self) -> None:
        """Nothing to close here: the RAG deployment owns (and flushes) the collections."""

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method not in COLLECTION_CALLS:
            raise AttributeError(method)
        return functools.partial(self._call, method)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._handle.call.remote(method, *args, **kwargs).result()
        except Exception as e:
            error = local_error(e)
            if error is e:
                raise
            raise error from e
