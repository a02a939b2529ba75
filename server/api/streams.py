"""Bridging the engine thread and the event loop: pin adapters, submit, stream outputs, cancel."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool

from server.api.convert import PreparedRequest
from server.api.deps import ServingState
from server.engine.types import GenerationOutput

logger = logging.getLogger(__name__)


async def pin_adapter(state: ServingState, prepared: PreparedRequest) -> None:
    """Makes the request's adapter resident and pins it once per generation (released by the engine)."""
    if prepared.adapter is None:
        return
    pinned = 0
    try:
        for gen in prepared.generations:
            gen.adapter_slot = await run_in_threadpool(state.registry.acquire, prepared.adapter)
            pinned += 1
    except BaseException:
        for _ in range(pinned):
            state.registry.release(prepared.adapter)
        raise


async def generate(
    state: ServingState, prepared: PreparedRequest
) -> AsyncIterator[tuple[int, GenerationOutput]]:
    """Yields ``(choice index, output)`` until every choice has finished.

    The adapter must already be pinned (:func:`pin_adapter`). If the consumer stops early (client
    disconnect, cancellation), every unfinished generation is cancelled in the engine, which frees
    its batch row at the next step.
    """
    loop = asyncio.get_running_loop()
    outputs: asyncio.Queue[GenerationOutput] = asyncio.Queue()
    index = {gen.request_id: i for i, gen in enumerate(prepared.generations)}
    unfinished = set(index)

    def emit(output: GenerationOutput) -> None:  # called on the engine thread
        loop.call_soon_threadsafe(outputs.put_nowait, output)

    submitted = 0
    try:
        for gen in prepared.generations:
            state.engine.submit(gen, emit)
            submitted += 1
        while unfinished:
            output = await outputs.get()
            if output.finished:
                unfinished.discard(output.request_id)
            yield index[output.request_id], output
    finally:
        for gen in prepared.generations[:submitted]:
            if gen.request_id in unfinished:
                state.engine.cancel(gen.request_id)
        if prepared.adapter is not None:
            for _ in prepared.generations[submitted:]:  # never reached the engine, which releases the rest
                state.registry.release(prepared.adapter)
