"""One engine replica: the whole app of ``server/app.py`` (base model loaded once), reached through
:func:`server.ray.asgi_bridge.call_app`; its adapter registry is Ray Serve's multiplexed LRU, and its
RAG collections are the RAG deployment's (:class:`server.ray.rag_client.RemoteCollections`)."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool

from adapters.registry import AdapterInUse
from server.api.health.api_router import WEDGED_AFTER_SECONDS
from server.app import build_state, create_app
from server.config import Settings
from server.ray.asgi_bridge import ForwardedRequest, ResponseStart, call_app
from server.ray.rag_client import RemoteCollections
from server.ray.routing import StoreChange

logger = logging.getLogger(__name__)

REPLICA_HEADER = b"x-loraplex-replica"
BUSY_RETRY_SECONDS = 30.0  # how long a store change waits for requests pinning the adapter to finish


def replica_settings(settings: Settings, cpus_per_replica: float) -> Settings:
    """The replica's settings: thread counts follow its Ray CPUs (not the node's cores) unless given."""
    cores = max(1, int(cpus_per_replica))
    update: dict[str, Any] = {}
    if settings.prefill_worker == "auto":
        update["prefill_worker"] = "on" if cores >= 2 else "off"
    if settings.torch_threads is None:
        update["torch_threads"] = max(1, cores // 2) if cores >= 2 else 1
    return settings.model_copy(update=update)


class AdapterToken:
    """What Ray Serve's multiplexed LRU holds for an adapter; evicting it frees the registry slot."""

    def __init__(self, replica: EngineReplica, name: str):
        self.replica = replica
        self.name = name

    async def __del__(self) -> None:
        await run_in_threadpool(self.replica.unload_if_idle, self.name)


class EngineReplica:
    """The body of the engine deployment; :func:`server.ray.app.build_application` adds the
    ``@serve.multiplexed`` loader (``adapter``) and the deployment options."""

    async def __init__(self, settings: Settings, cpus_per_replica: float, rag: Any):
        """``rag``: the RAG deployment's handle."""
        from ray import serve

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        settings = replica_settings(settings, cpus_per_replica)
        build = functools.partial(build_state, rag=RemoteCollections(rag, settings))
        self.app = create_app(settings, build=build)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        logger.info("replica %s ready", self.replica_id)

    @property
    def state(self):
        return self.app.state.serving

    async def adapter(self, model_id: str) -> AdapterToken:  # replaced by the multiplexed loader
        raise NotImplementedError

    async def load_adapter(self, model_id: str) -> AdapterToken:
        """Makes a stored adapter resident ahead of the request (merges are built by the request);
        a name the store lacks is left to the request, which answers 404 as ``loraplex serve`` does."""
        if self.state.store.exists(model_id):
            try:
                await run_in_threadpool(self.state.registry.load, model_id)
            except (ValueError, OSError) as e:  # invalid or unreadable: the request reports it
                logger.warning("adapter %s not preloaded: %s", model_id, e)
        return AdapterToken(self, model_id)

    def unload_if_idle(self, name: str) -> None:
        try:
            self.state.registry.unload(name)
        except AdapterInUse:
            logger.info("adapter %s left to the registry's LRU: requests still use it", name)

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        """Serves one forwarded request through the app (a streaming Ray Serve call)."""
        from ray import serve

        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.adapter(model_id)
        headers = ((REPLICA_HEADER, self.replica_id.encode()),)
        async for item in call_app(self.app, request, headers):
            yield item

    def check_health(self) -> None:
        """Ray Serve's health check: a dead or wedged engine gets this replica replaced."""
        health = self.state.engine.health()
        if not health.alive:
            raise RuntimeError("engine loop is dead")
        if health.seconds_since_step > WEDGED_AFTER_SECONDS:
            raise RuntimeError(f"engine loop wedged for {health.seconds_since_step:.0f} s")

    async def apply_store_change(self, change: StoreChange, name: str) -> str:
        """Drops this replica's copy of a changed adapter (called on every replica by the ingress's
        ``broadcast`` after an upload, delete, save or unload).

        Returns:
            This replica's id.
        """
        await run_in_threadpool(self._drop_copy, change, name)
        return self.replica_id

    def _drop_copy(self, change: StoreChange, name: str) -> None:
        """Forgets or unloads ``name``, waiting (bounded) for the requests that pin it to finish."""
        registry = self.state.registry
        deadline = time.monotonic() + BUSY_RETRY_SECONDS
        while True:
            try:
                if change == "forget":
                    registry.forget(name)
                else:
                    registry.unload(name)
                return
            except AdapterInUse:
                if time.monotonic() > deadline:
                    logger.warning("adapter %s still in use after %.0f s", name, BUSY_RETRY_SECONDS)
                    return
                time.sleep(0.05)

    async def __del__(self) -> None:
        await self._lifespan.__aexit__(None, None, None)
