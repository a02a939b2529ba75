"""The Responses API's logic: input → the chat template (exactly as chat) → the engine → OpenAI's
``response`` object, or its stream of typed events, each with a ``sequence_number``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from server.api.auth import Principal
from server.api.chat.serving import chat_messages
from server.api.chat.tool_format import ToolFormatError
from server.api.deps import ServingState
from server.api.engine_bridge import EngineStream
from server.api.engine_request import PreparedRequest, prepare, render_chat
from server.api.errors import public_message, status_for
from server.api.generation_serving import Choice, EngineServing
from server.api.responses.output_items import OutputItemStream, output_items
from server.api.responses.protocol import ResponsesRequest, responses_param
from server.engine.structured.spec import GrammarInvalid


def sse_event(payload: dict) -> str:
    return f"event: {payload['type']}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


class ResponsesServing(EngineServing):
    """One ``POST /v1/responses``: the assistant's message and, with tools, its function calls."""

    def __init__(self, state: ServingState, prepared: PreparedRequest, body: ResponsesRequest, tools: bool):
        super().__init__(state, prepared)
        self.body = body
        self.tools = tools  # read function calls out of the output
        self.sequence_number = 0

    @property
    def response_id(self) -> str:
        return "resp_" + self.prepared.request_id

    def usage(self, choice: Choice) -> dict:
        input_tokens = len(self.prepared.generations[0].prompt_token_ids)
        return {
            "input_tokens": input_tokens,
            # true while the engine has no prefix cache: nothing is read from or written to one
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": choice.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + choice.completion_tokens,
        }

    def response(
        self,
        status: str,
        choice: Choice | None = None,
        error: dict | None = None,
        output: list[dict] | None = None,
    ) -> dict:
        """The ``response`` object; ``choice`` is the finished generation (None while in progress),
        ``output`` its items when a stream built them (else they are read from ``choice``)."""
        incomplete = choice is not None and choice.finish_reason == "length"
        if output is None:
            output = [] if choice is None else self.output(choice.text, _item_status(status))
        body = self.body
        text_format = body.text.format if body.text and body.text.format else {"type": "text"}
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.prepared.model_name,
            "adapter": self.prepared.adapter,
            "output": output,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
            "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [],
            "previous_response_id": None,
            "reasoning": None,
            "store": False,
            "background": False,
            "text": {"format": text_format},
            "truncation": "disabled",
            "usage": None if choice is None else self.usage(choice),
            "user": body.user,
            "metadata": {},
        }

    def output(self, text: str, status: str) -> list[dict]:
        return output_items(text, self.tools, self.prepared.request_id, status)

    def final_body(self, choices: list[Choice]) -> dict:
        (choice,) = choices
        return self.response(_status(choice), choice)

    def event(self, kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return sse_event(payload)

    async def stream_events(
        self, engine_stream: EngineStream, include_usage: bool, extra: dict
    ) -> AsyncIterator[str]:
        """``response.created`` … ``response.completed`` (``response.incomplete`` when
        ``max_output_tokens`` ended it); a failure is an ``error`` event, then ``response.failed``."""
        items = OutputItemStream(self.prepared.request_id, self.tools)
        choice = Choice()
        outputs = engine_stream.outputs()
        try:
            yield self.event("response.created", response=self.response("in_progress"))
            yield self.event("response.in_progress", response=self.response("in_progress"))
            for kind, fields in items.start():
                yield self.event(kind, **fields)
            async for _, output in outputs:
                choice.add(output)
                if output.error is not None:
                    raise output.error
                if output.text_delta:
                    for kind, fields in items.feed(output.text_delta):
                        yield self.event(kind, **fields)
            status = _status(choice)
            for kind, fields in items.finish(status):
                yield self.event(kind, **fields)
            final = "response.completed" if status == "completed" else "response.incomplete"
            yield self.event(final, response=self.response(status, choice, output=items.items))
        except Exception as e:  # noqa: BLE001 - the stream has started: report in-band, then end it
            message = public_message(e)
            code = getattr(e, "code", None)
            yield self.event("error", code=code, message=message, param=getattr(e, "param", None))
            failed_code = "rate_limit_exceeded" if status_for(e) == 429 else "server_error"
            error = {"code": failed_code, "message": message}
            yield self.event("response.failed", response=self.response("failed", choice, error))
        finally:
            await outputs.aclose()
            engine_stream.close()


def _item_status(status: str) -> str:
    """An item's status: a failed response keeps what was generated as incomplete items."""
    return "incomplete" if status == "failed" else status


def _status(choice: Choice) -> str:
    return "incomplete" if choice.finish_reason == "length" else "completed"


async def create_response(
    state: ServingState, body: ResponsesRequest, request: Request, principal: Principal
):
    chat = body.to_chat_request()
    prompt_ids = render_chat(state, chat_messages(chat))
    try:
        # off the event loop: compiling an output grammar may take a while (bounded by its time limit)
        prepared = await run_in_threadpool(
            prepare, state, chat, [prompt_ids], body.max_output_tokens, principal, "max_output_tokens"
        )
    except (GrammarInvalid, ToolFormatError) as e:  # chat's field names, as this request names them
        raise type(e)(responses_param(e.param), e.reason) from e
    serving = ResponsesServing(state, prepared, body, tools=chat.uses_tools())
    return await serving.respond(request, principal, body.stream)
