"""An engine that needs no model: it answers each request with the prompt's own tokens, in order.

Implements :class:`server.engine.protocol.Engine` with the real engine's contract (one output per
token, a final output with usage, the lease share released exactly once, cancellation), so API tests
exercise shapes, streaming, limits and errors without running a forward pass.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from server.api.deps import ServingState
from server.app import build_state
from server.config import Settings
from server.engine.types import (
    EngineHealth,
    EngineStats,
    EngineUnavailable,
    GenerationFailed,
    GenerationOutput,
    GenerationRequest,
    TokenLogprob,
)

FAKE_LOGPROB = -0.5  # every token's logprob, when a request asks for them


class FakeEngine:
    def __init__(self, tokenizer, fail_after_tokens: int | None = None):
        self.tokenizer = tokenizer
        self.fail_after_tokens = fail_after_tokens  # a failure in the engine after this many tokens
        self.on_fatal: Callable[[], None] | None = None
        self.stats = EngineStats()
        self.submitted: list[GenerationRequest] = []
        self.cancelled: set[str] = set()
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._work.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit_all(self, requests: list[GenerationRequest], emit) -> None:
        if self._thread is None or not self._thread.is_alive():
            for request in requests:
                request.lease.release()
            raise EngineUnavailable("The generation engine is not running.")
        self.submitted.extend(requests)
        for request in requests:
            self._work.put((request, emit))

    def cancel(self, request_id: str) -> None:
        self.cancelled.add(request_id)

    def health(self) -> EngineHealth:
        alive = self._thread is not None and self._thread.is_alive()
        return EngineHealth(alive=alive, seconds_since_step=0.0, running=0, waiting=self._work.qsize())

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            request, emit = item
            self._generate(request, emit)

    def _generate(self, request: GenerationRequest, emit) -> None:
        ids = request.prompt_token_ids[: request.sampling.max_tokens]
        sent = ""
        error = None
        reason = "length" if len(request.prompt_token_ids) >= request.sampling.max_tokens else "stop"
        for n in range(1, len(ids) + 1):
            if request.request_id in self.cancelled:
                reason = "cancelled"
                break
            if self.fail_after_tokens is not None and n > self.fail_after_tokens:
                reason, error = "error", GenerationFailed("generation failed: simulated")
                break
            text = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
            logprobs = [] if request.sampling.logprobs is None else [TokenLogprob(ids[n - 1], FAKE_LOGPROB)]
            emit(
                GenerationOutput(
                    request.request_id,
                    text_delta=text[len(sent) :],
                    token_ids=[ids[n - 1]],
                    logprobs=logprobs,
                )
            )
            sent = text
            time.sleep(0.001)
        request.lease.release()
        emit(
            GenerationOutput(
                request.request_id,
                finished=True,
                finish_reason=reason,
                prompt_tokens=len(request.prompt_token_ids),
                completion_tokens=len(ids),
                error=error,
            )
        )


def fake_engine_state(**engine_options) -> Callable[[Settings], ServingState]:
    """A ``build`` for :func:`server.app.create_app`: the real state with a :class:`FakeEngine`."""

    def build(settings: Settings) -> ServingState:
        state = build_state(settings)
        state.engine = FakeEngine(state.base.tokenizer, **engine_options)
        return state

    return build
