"""Keeps a new adapter's requests together while Ray Serve learns where its first one went.

Ray Serve's router sends a multiplexed request to a replica that reports the model id; a replica
reports it only after loading it (pushed to the controller every 0.1 s, then to the routers). Until
that report arrives, the router sees no replica with the id and spreads further requests for it over
the replicas with the fewest models, so a burst for a new adapter lands on every replica and each
loads it. This gate lets the first request for an id go alone and holds the others until the router
has the report (or ``settle_seconds`` passed): then they follow it to its replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

logger = logging.getLogger(__name__)


def replicas_known_for(handle: Any, model_id: str) -> set | None:
    """The replicas Ray Serve's router of ``handle`` knows to hold ``model_id``; None if that cannot
    be read (the router's internals, as of ray 2.60, which the ``ray`` extra pins)."""
    try:
        request_router = handle._router._asyncio_router._request_router
        return set(request_router._multiplexed_model_id_to_replica_ids.get(model_id, ()))
    except AttributeError:
        return None


class PlacementGate:
    """One gate per ingress: remembers which multiplexed ids it has already placed."""

    def __init__(self, settle_seconds: float = 2.0, remembered_ids: int = 4096):
        self.settle_seconds = settle_seconds
        self.remembered_ids = remembered_ids
        self._placed: OrderedDict[str, asyncio.Event] = OrderedDict()

    @contextlib.asynccontextmanager
    async def first_of(self, handle: Any, model_id: str) -> AsyncIterator[None]:
        """Wraps sending a request for ``model_id`` until its response starts."""
        if not model_id:
            yield
            return
        placed = self._placed.get(model_id)
        if placed is not None:
            self._placed.move_to_end(model_id)
            if not placed.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(placed.wait(), timeout=self.settle_seconds + 60.0)
            yield
            return
        placed = self._placed[model_id] = asyncio.Event()
        while len(self._placed) > self.remembered_ids:
            self._placed.popitem(last=False)
        try:
            yield
            await self._settle(handle, model_id)
        except BaseException:
            self._placed.pop(model_id, None)  # not placed: the next request for it goes first
            raise
        finally:
            placed.set()

    async def _settle(self, handle: Any, model_id: str) -> None:
        deadline = time.monotonic() + self.settle_seconds
        while time.monotonic() < deadline:
            known = replicas_known_for(handle, model_id)
            if known is None or known:
                return
            await asyncio.sleep(0.01)
        logger.info("router did not learn where %s is within %.1f s", model_id, self.settle_seconds)
