"""What the generating features share: admitting a prepared request, running it through the
engine, and answering with one JSON body or a stream of SSE events.

:class:`EngineServing` owns admission, the adapter lease, cancellation on disconnect and errors; a
feature says how its final body and its stream look (the native TGI routes, the Responses API).
:class:`GenerationServing` is OpenAI's ``choices`` form on top of it: chat and text completions say
only how one choice and one chunk look (:meth:`choice_body`, :meth:`chunk_choice`).
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.auth import Principal
from server.api.deps import ServingState
from server.api.engine_bridge import EngineStream, admit
from server.api.engine_request import PreparedRequest
from server.api.errors import error_response
from server.api.logprobs import formatter_for
from server.engine.types import GenerationOutput, TokenLogprob


@dataclass
class Choice:
    """One choice's text and final state, accumulated from the engine's outputs."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_sequence: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    error: BaseException | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    eos_logprob: TokenLogprob | None = None

    def add(self, output: GenerationOutput) -> None:
        self.text += output.text_delta
        self.token_ids.extend(output.token_ids)
        self.logprobs.extend(output.logprobs)
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        if output.eos_logprob is not None:
            self.eos_logprob = output.eos_logprob
        if output.finished:
            self.finish_reason = output.finish_reason
            self.stop_sequence = output.stop_sequence
            self.completion_tokens = output.completion_tokens
            self.prompt_tokens = output.prompt_tokens
            self.cached_prompt_tokens = output.cached_prompt_tokens
            self.error = output.error


def usage(choices: list[Choice], prepared: PreparedRequest) -> dict:
    """OpenAI's ``usage``: ``n`` choices share their prompt, which is counted once."""
    prompt_tokens = sum(len(g.prompt_token_ids) for g in prepared.generations[:: prepared.n])
    completion_tokens = sum(c.completion_tokens for c in choices)
    # of each prompt's first choice, like prompt_tokens (its other choices may hit the cache it filled)
    cached_tokens = sum(c.cached_prompt_tokens for c in choices[:: prepared.n])
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def sse_error(exc: BaseException) -> str:
    """An SSE ``error`` event carrying the OpenAI error body (message only, never a traceback)."""
    return f"event: error\ndata: {error_response(exc).body.decode()}\n\n"


class EngineServing(ABC):
    """Runs one prepared request and shapes its answer; one instance per HTTP request."""

    def __init__(self, state: ServingState, prepared: PreparedRequest):
        self.state = state
        self.prepared = prepared
        self.created = int(time.time())
        self.logprob_format = formatter_for(state.base.tokenizer)

    @abstractmethod
    def final_body(self, choices: list[Choice]) -> dict | list:
        """The non-streaming answer, once every choice has finished."""

    @abstractmethod
    def stream_events(
        self, engine_stream: EngineStream, include_usage: bool, extra: dict
    ) -> AsyncIterator[str]:
        """The streaming answer: SSE events, errors after the start included (the stream has begun)."""

    def error_response(self, exc: BaseException) -> JSONResponse:
        """The answer when a non-streaming generation fails."""
        return error_response(exc)

    async def respond(
        self,
        request: Request,
        principal: Principal,
        stream: bool,
        include_usage: bool = False,
        extra: dict | None = None,
    ):
        """Admits, leases and submits; then a JSON response or an SSE stream.

        Errors before generation starts (limits, an unknown adapter) raise and become HTTP errors;
        once a stream has started they arrive in-band, as the feature's stream says.
        """
        request.state.adapter = self.prepared.adapter
        admit(self.state, self.prepared, principal)
        engine_stream = EngineStream(self.state, self.prepared)
        await engine_stream.start()  # an unknown or invalid adapter fails here, before any response
        if stream:
            events = self.stream_events(engine_stream, include_usage, extra or {})
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        choices = [Choice() for _ in self.prepared.generations]
        outputs = engine_stream.outputs()
        try:
            async for i, output in outputs:
                choices[i].add(output)
                if await request.is_disconnected():
                    break
        finally:
            await outputs.aclose()
            engine_stream.close()
        failed = next((c.error for c in choices if c.error is not None), None)
        if failed is not None:
            return self.error_response(failed)
        body = self.final_body(choices)
        return JSONResponse({**body, **(extra or {})} if extra else body)


class GenerationServing(EngineServing):
    """OpenAI's ``choices`` answers (chat and text completions)."""

    object_name: str  # "chat.completion" / "text_completion"
    chunk_object_name: str
    id_prefix: str  # "chatcmpl-" / "cmpl-"

    # ------------------------------------------------------------------ what a feature defines
    @abstractmethod
    def choice_body(self, index: int, choice: Choice) -> dict:
        """One entry of the final body's ``choices``."""

    @abstractmethod
    def chunk_choice(
        self,
        index: int,
        text: str | None,
        finish_reason: str | None,
        first: bool,
        logprobs: list[TokenLogprob],
    ) -> dict:
        """One entry of a stream chunk's ``choices`` (``first``: the choice's opening chunk), with the
        logprobs of the tokens it carries."""

    def opening_chunks(self) -> bool:
        """Whether every choice opens with an empty chunk (chat sends the assistant role there)."""
        return False

    def first_output_chunk(self, index: int, output: GenerationOutput) -> dict | None:
        """A chunk to send before a choice's first output (completions' ``echo``), or None."""
        return None

    # ------------------------------------------------------------------ shared
    @property
    def base(self) -> dict:
        return {
            "id": self.id_prefix + self.prepared.request_id,
            "object": self.object_name,
            "created": self.created,
            "model": self.prepared.model_name,
        }

    def final_body(self, choices: list[Choice]) -> dict:
        return {
            **self.base,
            "adapter": self.prepared.adapter,
            "choices": [self.choice_body(i, c) for i, c in enumerate(choices)],
            "usage": usage(choices, self.prepared),
        }

    def _chunk(
        self,
        index: int,
        text: str | None,
        finish_reason: str | None,
        first: bool = False,
        logprobs: list[TokenLogprob] | None = None,
    ) -> dict:
        return {
            **self.base,
            "object": self.chunk_object_name,
            "choices": [self.chunk_choice(index, text, finish_reason, first, logprobs or [])],
        }

    async def stream_events(
        self, engine_stream: EngineStream, include_usage: bool, extra: dict
    ) -> AsyncIterator[str]:
        """``chat.completion.chunk`` / ``text_completion`` chunks; an error is an ``error`` event, then
        ``[DONE]``."""
        choices = [Choice() for _ in self.prepared.generations]
        outputs = engine_stream.outputs()
        try:
            if self.opening_chunks():
                for i in range(len(choices)):
                    yield sse(self._chunk(i, "", None, first=True))
            started: set[int] = set()
            async for i, output in outputs:
                choices[i].add(output)
                if output.error is not None:
                    yield sse_error(output.error)
                    yield sse("[DONE]")
                    return
                if i not in started:
                    started.add(i)
                    if (opening := self.first_output_chunk(i, output)) is not None:
                        yield sse(opening)
                if output.text_delta or (output.logprobs and not output.finished):
                    yield sse(self._chunk(i, output.text_delta, None, logprobs=output.logprobs))
                if output.finished:
                    final_logprobs = [] if output.text_delta else output.logprobs
                    yield sse(self._chunk(i, None, output.finish_reason, logprobs=final_logprobs))
        except Exception as e:  # noqa: BLE001 - the stream has started: report in-band, then end it
            yield sse_error(e)
            yield sse("[DONE]")
            return
        finally:
            await outputs.aclose()
            engine_stream.close()
        if include_usage or extra:  # the final chunk carries usage and, with RAG, the sources
            final = {**self.base, "object": self.chunk_object_name, "choices": [], **extra}
            if include_usage:
                final["usage"] = usage(choices, self.prepared)
            yield sse(final)
        yield sse("[DONE]")
