"""OpenAI-compatible routes: chat completions, completions, models. Thin: parse, convert, stream."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from rag.prompt import build_rag_messages, last_user_text
from server.api import convert
from server.api.auth import Caller, Principal
from server.api.deps import ServingState, State
from server.api.embeddings.serving import embedding_model_entries
from server.api.errors import APIError, error_response
from server.api.protocol import ChatCompletionRequest, CompletionRequest
from server.api.routes_rag import check_visible
from server.api.streams import admit, finish_admission, generate, pin_adapter
from server.engine.types import GenerationOutput

router = APIRouter(tags=["openai"])


@dataclass
class Choice:
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    error: BaseException | None = None
    extra: dict = field(default_factory=dict)


@router.get("/v1/models")
def list_models(state: State, caller: Caller) -> dict:
    created = int(state.base.path.stat().st_mtime) if state.base.path.exists() else 0
    data = [
        {"id": state.model_id, "object": "model", "created": created, "owned_by": "loraplex", "parent": None}
    ]
    names = set(state.store.names()) | {r.name for r in state.registry.resident()}
    for name in sorted(n for n in names if caller.may_use_adapter(n)):
        data.append(
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "loraplex",
                "parent": state.model_id,
            }
        )
    data.extend(embedding_model_entries(state))
    return {"object": "list", "data": data}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State, caller: Caller):
    messages = convert.chat_messages(body)
    max_tokens = body.max_completion_tokens or body.max_tokens
    sources = None
    if body.rag is not None:
        messages, sources = await _retrieve_into(state, body, messages, max_tokens, caller)
    prompt_ids = convert.render_chat(state, messages)
    prepared = convert.prepare(state, body, [prompt_ids], max_tokens, caller)
    extra = {"sources": sources} if sources is not None else {}
    return await _respond(state, prepared, body, request, caller, chat=True, extra=extra)


async def _retrieve_into(
    state: ServingState, body: ChatCompletionRequest, messages: list[dict], max_tokens: int | None, caller
) -> tuple[list[dict], list[dict]]:
    """Retrieves with the last user message and puts the numbered passages into the prompt.

    The passages get what the context window leaves after the prompt and ``max_tokens``; the
    lowest-ranked are dropped first. Returns the new messages and the ``sources`` actually used.
    """
    options = body.rag
    check_visible(caller, options.collection)
    query = last_user_text(messages)
    if not query:
        raise APIError(400, "retrieval needs a user message to search with", param="messages")
    started = time.perf_counter()
    passages = await run_in_threadpool(
        state.rag.retrieve, options.collection, query, options.top_k, options.mode, options.filter
    )
    state.metrics.rag_search_seconds.observe(time.perf_counter() - started)
    tokenizer = state.base.tokenizer
    prompt_tokens = len(convert.render_chat(state, messages))
    budget = state.context_length - prompt_tokens - (max_tokens or state.settings.default_max_tokens)
    with_passages, used = build_rag_messages(
        messages, passages, lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]), budget
    )
    return with_passages, [p.to_source(n) for n, p in enumerate(used, start=1)]


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: State, caller: Caller):
    prompts = convert.completion_prompts(state, body)
    prepared = convert.prepare(state, body, prompts, body.max_tokens, caller)
    return await _respond(state, prepared, body, request, caller, chat=False)


async def _respond(
    state: ServingState,
    prepared: convert.PreparedRequest,
    body,
    request: Request,
    caller: Principal,
    chat: bool,
    extra: dict | None = None,
):
    request.state.adapter = prepared.adapter
    admit(state, prepared, caller)
    try:
        await pin_adapter(state, prepared)
    except BaseException:
        finish_admission(state, prepared)
        raise
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream_events(state, prepared, chat, include_usage, extra or {})
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    choices = [Choice() for _ in prepared.generations]
    stream = generate(state, prepared)
    try:
        async for i, output in stream:
            _accumulate(choices[i], output)
            if await request.is_disconnected():
                break
    finally:
        await stream.aclose()
    failed = next((c.error for c in choices if c.error is not None), None)
    if failed is not None:
        return error_response(failed)
    return JSONResponse({**_final_body(prepared, choices, chat), **(extra or {})})


def _accumulate(choice: Choice, output: GenerationOutput) -> None:
    choice.text += output.text_delta
    if output.finished:
        choice.finish_reason = output.finish_reason
        choice.completion_tokens = output.completion_tokens
        choice.prompt_tokens = output.prompt_tokens
        choice.error = output.error


def _usage(choices: list[Choice], prepared: convert.PreparedRequest) -> dict:
    # n choices share their prompt, which is counted once, as OpenAI does.
    prompt_tokens = sum(len(g.prompt_token_ids) for g in prepared.generations[:: prepared.n])
    completion_tokens = sum(c.completion_tokens for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _final_body(prepared: convert.PreparedRequest, choices: list[Choice], chat: bool) -> dict:
    created = int(time.time())
    if chat:
        items = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(choices)
        ]
        obj, prefix = "chat.completion", "chatcmpl-"
    else:
        items = [
            {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
            for i, c in enumerate(choices)
        ]
        obj, prefix = "text_completion", "cmpl-"
    return {
        "id": prefix + prepared.request_id,
        "object": obj,
        "created": created,
        "model": prepared.model_name,
        "adapter": prepared.adapter,
        "choices": items,
        "usage": _usage(choices, prepared),
    }


def _sse_error(exc: BaseException) -> str:
    """An SSE ``error`` event carrying the OpenAI error body (message only, never a traceback)."""
    response = error_response(exc)
    return f"event: error\ndata: {response.body.decode()}\n\n"


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def _stream_events(
    state: ServingState, prepared: convert.PreparedRequest, chat: bool, include_usage: bool, extra: dict
) -> AsyncIterator[str]:
    created = int(time.time())
    obj, prefix = ("chat.completion.chunk", "chatcmpl-") if chat else ("text_completion", "cmpl-")
    base = {
        "id": prefix + prepared.request_id,
        "object": obj,
        "created": created,
        "model": prepared.model_name,
    }

    def chunk(index: int, text: str | None, finish_reason: str | None, role: bool = False) -> dict:
        if chat:
            delta: dict = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**base, "choices": [choice]}

    choices = [Choice() for _ in prepared.generations]
    if chat:
        for i in range(len(choices)):
            yield _sse(chunk(i, "", None, role=True))
    stream = generate(state, prepared)
    try:
        async for i, output in stream:
            _accumulate(choices[i], output)
            if output.error is not None:
                yield _sse_error(output.error)
                yield _sse("[DONE]")
                return
            if output.text_delta:
                yield _sse(chunk(i, output.text_delta, None))
            if output.finished:
                yield _sse(chunk(i, None if chat else "", output.finish_reason))
    except Exception as e:  # noqa: BLE001 - the stream has started: report in-band, then end it
        yield _sse_error(e)
        yield _sse("[DONE]")
        return
    finally:
        await stream.aclose()
    if include_usage or extra:  # the final chunk carries usage and, with RAG, the sources
        final = {**base, "choices": [], **extra}
        if include_usage:
            final["usage"] = _usage(choices, prepared)
        yield _sse(final)
    yield _sse("[DONE]")
