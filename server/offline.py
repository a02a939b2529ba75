"""The serving engine used in-process, without HTTP (``loraplex eval`` generates through it)."""

from __future__ import annotations

import queue
import uuid

from adapters.lease import AdapterChoice
from server.api.engine_request import render_chat
from server.app import build_state
from server.config import Settings
from server.engine.types import GenerationOutput, GenerationRequest, SamplingParams


class InProcessGenerator:
    """Greedy generation through the same engine, batching and adapters the server uses.

    Usable as ``generate(batch_of_messages, adapter, max_tokens) -> replies``; a context manager that
    starts the engine thread and stops it.
    """

    def __init__(self, settings: Settings):
        self.state = build_state(settings)

    def __enter__(self) -> InProcessGenerator:
        self.state.engine.start()
        return self

    def __exit__(self, *exc) -> None:
        self.state.engine.stop()

    def __call__(self, batch: list[list[dict]], adapter: str | None, max_tokens: int) -> list[str]:
        registry, engine = self.state.registry, self.state.engine
        outputs: queue.Queue[GenerationOutput] = queue.Queue()
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        ids = []
        for messages in batch:
            prompt_ids = render_chat(self.state, messages)  # exactly as the HTTP API renders chats
            # the engine releases the lease when the request finishes (or if it refuses it)
            lease = registry.lease(AdapterChoice(adapter or None))
            request = GenerationRequest(uuid.uuid4().hex, prompt_ids, params, lease)
            engine.submit(request, outputs.put)
            ids.append(request.request_id)
        texts = dict.fromkeys(ids, "")
        pending = set(ids)
        while pending:
            output = outputs.get(timeout=600)
            texts[output.request_id] += output.text_delta
            if output.finished:
                if output.error is not None:
                    raise output.error
                pending.discard(output.request_id)
        return [texts[i] for i in ids]
