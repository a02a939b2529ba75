"""Bridging the engine thread and the event loop: admit, lease the adapter, submit, stream, cancel."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool

from server.api.auth import Principal
from server.api.deps import ServingState
from server.api.engine_request import PreparedRequest
from server.api.errors import APIError
from server.engine.types import GenerationOutput

logger = logging.getLogger(__name__)


def admit(state: ServingState, prepared: PreparedRequest, principal: Principal) -> None:
    """Bounded admission and per-key rate limits; refuses at once with 429 rather than queueing.

    A request that could never be admitted (more sequences than ``--max-pending`` in all) is a 400
    naming the limit: a 429 would have clients retry it forever.
    """
    sequences = len(prepared.generations)
    limit = state.settings.max_pending
    if sequences > limit:
        raise APIError(
            400,
            f"This request needs {sequences} sequences (prompts × n); the server runs at most {limit} "
            "at once (--max-pending). Send fewer prompts or a smaller n.",
            code="too_many_sequences",
            param="n" if prepared.n > 1 else "prompt",
        )
    tokens = sum(len(g.prompt_token_ids) + g.sampling.max_tokens for g in prepared.generations)
    try:
        state.rate_limiter.admit(principal, tokens)
    except APIError:
        state.metrics.rejected.labels("rate_limit").inc()
        raise
    with state.pending_lock:
        if state.pending + sequences > limit:
            state.metrics.rejected.labels("overloaded").inc()
            raise APIError(
                429,
                f"The server is at its limit of {limit} sequences; retry shortly.",
                code="server_overloaded",
                headers={"Retry-After": "1"},
            )
        state.pending += sequences


def finish_admission(state: ServingState, prepared: PreparedRequest) -> None:
    with state.pending_lock:
        state.pending -= len(prepared.generations)


def _lease_and_submit(state: ServingState, prepared: PreparedRequest, emit) -> None:
    """Leases the request's adapter (computing a merge once) and hands every generation to the engine.

    Runs in a worker thread, in one piece: once the lease exists the engine owns it (it releases each
    generation's share when that generation finishes, or all of them if the submission is refused).
    """
    lease = state.registry.lease(prepared.choice, holders=len(prepared.generations))
    for gen in prepared.generations:
        gen.lease = lease
    state.engine.submit_all(prepared.generations, emit)


class EngineStream:
    """One admitted request's generations, from lease and submission to the last output.

    :meth:`start` leases the adapter and submits (its errors, e.g. an unknown adapter, arrive before
    any response is sent); :meth:`outputs` yields ``(choice index, output)`` until every choice has
    finished. If the consumer stops early (client disconnect, cancellation) or the request times out,
    every unfinished generation is cancelled in the engine, which frees its batch row at the next
    step and releases its lease share. Admission is finished exactly once, by whichever ends it.
    """

    def __init__(self, state: ServingState, prepared: PreparedRequest):
        self.state = state
        self.prepared = prepared
        self._loop = asyncio.get_running_loop()
        self._outputs: asyncio.Queue[GenerationOutput] = asyncio.Queue()
        self._index = {gen.request_id: i for i, gen in enumerate(prepared.generations)}
        self._unfinished = set(self._index)
        self._started = time.perf_counter()
        self._closed = False

    def _emit(self, output: GenerationOutput) -> None:  # called on the engine thread
        self._loop.call_soon_threadsafe(self._outputs.put_nowait, output)

    async def start(self) -> None:
        try:
            await run_in_threadpool(_lease_and_submit, self.state, self.prepared, self._emit)
        except BaseException:
            finish_admission(self.state, self.prepared)
            raise

    async def outputs(self) -> AsyncIterator[tuple[int, GenerationOutput]]:
        state, metrics = self.state, self.state.metrics
        deadline = time.monotonic() + state.settings.request_timeout_seconds
        last = self._started
        first = True
        try:
            while self._unfinished:
                try:
                    output = await asyncio.wait_for(
                        self._outputs.get(), timeout=max(0.0, deadline - time.monotonic())
                    )
                except asyncio.TimeoutError:
                    raise APIError(
                        504, "The request timed out before generation finished.", code="request_timeout"
                    ) from None
                now = time.perf_counter()
                if first:
                    metrics.ttft.observe(now - self._started)
                    first = False
                else:
                    metrics.itl.observe(now - last)
                last = now
                if output.finished:
                    self._unfinished.discard(output.request_id)
                    metrics.generated_tokens.inc(output.completion_tokens)
                    metrics.prompt_tokens.inc(output.prompt_tokens)
                yield self._index[output.request_id], output
        finally:
            self.close()

    def close(self) -> None:
        """Cancels what is unfinished and ends the admission; idempotent."""
        if self._closed:
            return
        self._closed = True
        for request_id in self._unfinished:
            self.state.engine.cancel(request_id)
        finish_admission(self.state, self.prepared)
