"""Chat completions: messages (plus retrieved passages) → the chat template → the engine → OpenAI's
``chat.completion`` body or ``chat.completion.chunk`` stream."""

from __future__ import annotations

import time
from typing import Any, Protocol

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from rag.prompt import build_rag_messages, last_user_text
from server.api.auth import Principal
from server.api.chat.protocol import ChatCompletionRequest, ChatMessage
from server.api.chat.tool_call_stream import ToolCallStreamParser
from server.api.chat.tool_format import parse_tool_calls, render_tool_messages
from server.api.collections.api_router import check_visible
from server.api.deps import ServingState
from server.api.engine_request import prepare, render_chat, resolve_adapter, virtual_token_count
from server.api.errors import APIError
from server.api.generation_serving import Choice, GenerationServing


class ToolConversation(Protocol):
    """What renders a conversation: chat completions' and ``/tokenize``'s requests alike."""

    messages: list[ChatMessage]

    def effective_tools(self) -> tuple[list[dict], Any]: ...


def chat_messages(body: ToolConversation) -> list[dict]:
    """The request's messages as plain dicts (text parts joined; ``developer`` is a system turn).

    With tools, or tool turns in the history, they are rendered in the documented tool format
    (``server/api/chat/tool_format.py``: definitions in the system turn, ``<tool_call>`` blocks,
    ``<tool_response>`` turns), the same format the tool-call grammar generates and the parser reads.
    """
    has_tool_turns = any(m.role == "tool" or m.tool_calls for m in body.messages)
    tools, choice = body.effective_tools()
    if not (tools and choice != "none") and not has_tool_turns:
        return [{"role": template_role(m.role), "content": m.text()} for m in body.messages]
    raw = [
        {**m.model_dump(exclude_none=True), "role": template_role(m.role), "content": m.text()}
        for m in body.messages
    ]
    return render_tool_messages(raw, tools, choice)


def _wire_call(call) -> dict:
    function = {"name": call.name, "arguments": call.arguments_json}
    return {"id": call.id, "type": "function", "function": function}


def _wire_call_delta(delta) -> dict:
    wire: dict = {"index": delta.index}
    if delta.id is not None:
        wire["id"], wire["type"] = delta.id, "function"
    function: dict = {}
    if delta.name is not None:
        function["name"] = delta.name
    function["arguments"] = delta.arguments
    wire["function"] = function
    return wire


def template_role(role: str) -> str:
    """The chat template's role for a wire role: OpenAI's ``developer`` is a system turn."""
    return "system" if role == "developer" else role


class ChatServing(GenerationServing):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, state: ServingState, prepared, tools: bool = False):
        super().__init__(state, prepared)
        self.tools = tools  # parse tool calls out of the output
        self._tool_streams: dict[int, ToolCallStreamParser] = {}
        self._called: set[int] = set()

    def choice_body(self, index: int, choice: Choice) -> dict:
        message: dict = {"role": "assistant", "content": choice.text}
        reason = choice.finish_reason
        if self.tools:
            content, calls = parse_tool_calls(choice.text)
            message["content"] = content
            if calls:
                message["tool_calls"] = [_wire_call(c) for c in calls]
                reason = "tool_calls" if reason == "stop" else reason
        return {
            "index": index,
            "message": message,
            "logprobs": self._logprobs(choice.logprobs),
            "finish_reason": reason,
        }

    def chunk_choice(
        self, index: int, text: str | None, finish_reason: str | None, first: bool, logprobs: list
    ) -> dict:
        delta: dict = {"role": "assistant"} if first else {}
        if self.tools and not first:
            delta, finish_reason = self._tool_delta(index, text, finish_reason)
        elif text is not None:
            delta["content"] = text
        return {
            "index": index,
            "delta": delta,
            "logprobs": self._logprobs(logprobs) if logprobs else None,
            "finish_reason": finish_reason,
        }

    def _tool_delta(self, index: int, text: str | None, finish_reason: str | None) -> tuple[dict, str | None]:
        """A streamed choice's content and OpenAI tool-call deltas (name first, then arguments)."""
        parser = self._tool_streams.setdefault(index, ToolCallStreamParser())
        step = parser.feed(text) if text else parser.finish() if finish_reason else None
        delta: dict = {}
        if step is not None:
            if step.content:
                delta["content"] = step.content
            if step.tool_calls:
                self._called.add(index)
                delta["tool_calls"] = [_wire_call_delta(d) for d in step.tool_calls]
        if finish_reason == "stop" and index in self._called:
            finish_reason = "tool_calls"
        return delta, finish_reason

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
    serving = ChatServing(state, prepared, tools=body.uses_tools())
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
    virtual = virtual_token_count(state, resolve_adapter(state, body, principal))  # prompt/prefix tuning
    reserved = virtual + (max_tokens or state.settings.default_max_tokens)
    budget = state.context_length - prompt_tokens - reserved
    with_passages, used = build_rag_messages(
        messages, passages, lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]), budget
    )
    return with_passages, [p.to_source(n) for n, p in enumerate(used, start=1)]
