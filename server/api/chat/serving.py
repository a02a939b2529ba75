"""Chat completions: messages (plus retrieved passages) → the chat template → the engine → OpenAI's
``chat.completion`` body or ``chat.completion.chunk`` stream."""

from __future__ import annotations

import time

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from rag.prompt import build_rag_messages, last_user_text
from server.api.auth import Principal
from server.api.chat.protocol import ChatCompletionRequest
from server.api.collections.api_router import check_visible
from server.api.deps import ServingState
from server.api.engine_request import prepare, render_chat
from server.api.errors import APIError
from server.api.generation_serving import Choice, GenerationServing


def chat_messages(body: ChatCompletionRequest) -> list[dict]:
    """The request's messages as plain dicts (text parts joined; ``developer`` is a system turn)."""
    return [{"role": template_role(m.role), "content": m.text()} for m in body.messages]


def template_role(role: str) -> str:
    """The chat template's role for a wire role: OpenAI's ``developer`` is a system turn."""
    return "system" if role == "developer" else role


class ChatServing(GenerationServing):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def choice_body(self, index: int, choice: Choice) -> dict:
        return {
            "index": index,
            "message": {"role": "assistant", "content": choice.text},
            "logprobs": self._logprobs(choice.logprobs),
            "finish_reason": choice.finish_reason,
        }

    def chunk_choice(
        self, index: int, text: str | None, finish_reason: str | None, first: bool, logprobs: list
    ) -> dict:
        delta: dict = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        return {
            "index": index,
            "delta": delta,
            "logprobs": self._logprobs(logprobs) if logprobs else None,
            "finish_reason": finish_reason,
        }

    def _logprobs(self, items: list) -> dict | None:
        if self.prepared.generations[0].sampling.logprobs is None:
            return None
        return {"content": self.logprob_format.chat_content(items), "refusal": None}

    def opening_chunks(self) -> bool:
        return True


async def create_chat_completion(
    state: ServingState, body: ChatCompletionRequest, request: Request, principal: Principal
):
    messages = chat_messages(body)
    max_tokens = body.max_completion_tokens or body.max_tokens
    extra = {}
    if body.rag is not None:
        messages, sources = await _retrieve_into(state, body, messages, max_tokens, principal)
        extra["sources"] = sources
    prompt_ids = render_chat(state, messages)
    # off the event loop: compiling an output grammar may take a while (bounded by its time limit)
    prepared = await run_in_threadpool(prepare, state, body, [prompt_ids], max_tokens, principal)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    serving = ChatServing(state, prepared)
    return await serving.respond(request, principal, body.stream, include_usage, extra)


async def _retrieve_into(
    state: ServingState,
    body: ChatCompletionRequest,
    messages: list[dict],
    max_tokens: int | None,
    principal: Principal,
) -> tuple[list[dict], list[dict]]:
    """Retrieves with the last user message and puts the numbered passages into the prompt.

    The passages get what the context window leaves after the prompt and ``max_tokens``; the
    lowest-ranked are dropped first. Returns the new messages and the ``sources`` actually used.
    """
    options = body.rag
    check_visible(principal, options.collection)
    query = last_user_text(messages)
    if not query:
        raise APIError(400, "retrieval needs a user message to search with", param="messages")
    started = time.perf_counter()
    passages = await run_in_threadpool(
        state.rag.retrieve, options.collection, query, options.top_k, options.mode, options.filter
    )
    state.metrics.rag_search_seconds.observe(time.perf_counter() - started)
    tokenizer = state.base.tokenizer
    prompt_tokens = len(render_chat(state, messages))
    budget = state.context_length - prompt_tokens - (max_tokens or state.settings.default_max_tokens)
    with_passages, used = build_rag_messages(
        messages, passages, lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]), budget
    )
    return with_passages, [p.to_source(n) for n, p in enumerate(used, start=1)]
