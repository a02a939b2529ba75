"""What the API may use of an engine: the real :class:`~server.engine.engine.LLMEngine`, a fake in
API tests, or a handle on a remote replica. Nothing else of the engine is reached from ``server/api``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from server.engine.types import EngineHealth, EngineStats, GenerationOutput, GenerationRequest


class Engine(Protocol):
    """Generates for submitted requests on its own threads; outputs go to each request's ``emit``."""

    on_fatal: Callable[[], None] | None  # called once if the engine can no longer make progress
    stats: EngineStats

    def start(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def submit_all(self, requests: list[GenerationRequest], emit: Callable[[GenerationOutput], None]) -> None:
        """Queues every request or none; owns their lease shares from here on (see LLMEngine)."""
        ...

    def cancel(self, request_id: str) -> None: ...

    def health(self) -> EngineHealth: ...
