"""Bridging the engine thread and the event loop: pin adapters, submit, stream outputs, cancel."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool

from adapters.lora import LoRAWeights
from adapters.merging import merge_lora
from server.api.auth import Principal
from server.api.convert import PreparedRequest
from server.api.deps import ServingState
from server.api.errors import APIError
from server.engine.types import GenerationOutput

logger = logging.getLogger(__name__)


def admit(state: ServingState, prepared: PreparedRequest, principal: Principal) -> None:
    """Bounded admission and per-key rate limits; refuses at once with 429 rather than queueing."""
    sequences = len(prepared.generations)
    tokens = sum(len(g.prompt_token_ids) + g.sampling.max_tokens for g in prepared.generations)
    try:
        state.rate_limiter.admit(principal, tokens)
    except APIError:
        state.metrics.rejected.labels("rate_limit").inc()
        raise
    with state.pending_lock:
        if state.pending + sequences > state.settings.max_pending:
            state.metrics.rejected.labels("overloaded").inc()
            raise APIError(
                429,
                f"The server is at its limit of {state.settings.max_pending} sequences; retry shortly.",
                code="server_overloaded",
                headers={"Retry-After": "1"},
            )
        state.pending += sequences


def finish_admission(state: ServingState, prepared: PreparedRequest) -> None:
    with state.pending_lock:
        state.pending -= len(prepared.generations)


async def pin_adapter(state: ServingState, prepared: PreparedRequest) -> None:
    """Makes the request's adapter resident and pins it once per generation (released by the engine)."""
    if prepared.adapter is None:
        return
    pinned = 0
    try:
        for gen in prepared.generations:
            gen.adapter_slot = await run_in_threadpool(_acquire, state, prepared)
            pinned += 1
    except BaseException:
        for _ in range(pinned):
            state.registry.release(prepared.adapter)
        raise


def _acquire(state: ServingState, prepared: PreparedRequest) -> int:
    """Pins the request's adapter; a merge is computed once per canonical spec, off the engine thread."""
    registry, choice = state.registry, prepared.merge
    if choice is None:
        return registry.acquire(prepared.adapter)

    def compute() -> LoRAWeights:
        parts = [registry.read_weights(name) for name, _ in choice.spec.parts]
        return merge_lora(choice.spec, parts, prepared.adapter, max_rank=registry.max_rank)

    spec = choice.spec.to_dict()
    return registry.acquire_computed(prepared.adapter, compute, spec=spec, parts=choice.parts)


async def generate(
    state: ServingState, prepared: PreparedRequest
) -> AsyncIterator[tuple[int, GenerationOutput]]:
    """Yields ``(choice index, output)`` until every choice has finished.

    The request must be admitted and its adapter pinned (:func:`admit`, :func:`pin_adapter`). If the
    consumer stops early (client disconnect, cancellation) or the request times out, every unfinished
    generation is cancelled in the engine, which frees its batch row at the next step.
    """
    loop = asyncio.get_running_loop()
    outputs: asyncio.Queue[GenerationOutput] = asyncio.Queue()
    index = {gen.request_id: i for i, gen in enumerate(prepared.generations)}
    unfinished = set(index)
    metrics = state.metrics
    deadline = time.monotonic() + state.settings.request_timeout_seconds

    def emit(output: GenerationOutput) -> None:  # called on the engine thread
        loop.call_soon_threadsafe(outputs.put_nowait, output)

    submitted = 0
    started = last = time.perf_counter()
    first = True
    try:
        for gen in prepared.generations:
            state.engine.submit(gen, emit)
            submitted += 1
        while unfinished:
            try:
                output = await asyncio.wait_for(outputs.get(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise APIError(
                    504, "The request timed out before generation finished.", code="request_timeout"
                ) from None
            now = time.perf_counter()
            if first:
                metrics.ttft.observe(now - started)
                first = False
            else:
                metrics.itl.observe(now - last)
            last = now
            if output.finished:
                unfinished.discard(output.request_id)
                metrics.generated_tokens.inc(output.completion_tokens)
                metrics.prompt_tokens.inc(output.prompt_tokens)
            yield index[output.request_id], output
    finally:
        for gen in prepared.generations[:submitted]:
            if gen.request_id in unfinished:
                state.engine.cancel(gen.request_id)
        if prepared.adapter is not None:
            for _ in prepared.generations[submitted:]:  # never reached the engine, which releases the rest
                state.registry.release(prepared.adapter)
        finish_admission(state, prepared)
