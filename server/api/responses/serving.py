"""The Responses API's logic: input → the chat template (exactly as chat) → the engine → OpenAI's
``response`` object, or its stream of typed events, each with a ``sequence_number``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import Request

from server.api.auth import Principal
from server.api.chat.serving import template_role
from server.api.deps import ServingState
from server.api.engine_bridge import EngineStream
from server.api.engine_request import PreparedRequest, prepare, render_chat
from server.api.errors import public_message, status_for
from server.api.generation_serving import Choice, EngineServing
from server.api.responses.protocol import ResponsesRequest


def response_messages(body: ResponsesRequest) -> list[dict]:
    """The conversation for the chat template: ``instructions`` as a system turn, then ``input``."""
    turns = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        return [*turns, {"role": "user", "content": body.input}]
    return [*turns, *({"role": template_role(m.role), "content": m.text()} for m in body.input)]


def sse_event(payload: dict) -> str:
    return f"event: {payload['type']}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


class ResponsesServing(EngineServing):
    """One ``POST /v1/responses``; the single output item is the assistant's message."""

    def __init__(self, state: ServingState, prepared: PreparedRequest, body: ResponsesRequest):
        super().__init__(state, prepared)
        self.body = body
        self.sequence_number = 0

    @property
    def response_id(self) -> str:
        return "resp_" + self.prepared.request_id

    @property
    def message_id(self) -> str:
        return "msg_" + self.prepared.request_id

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

    def message(self, text: str, status: str) -> dict:
        content = (
            [{"type": "output_text", "text": text, "annotations": []}] if status != "in_progress" else []
        )
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def response(self, status: str, choice: Choice | None = None, error: dict | None = None) -> dict:
        """The ``response`` object; ``choice`` is the finished generation (None while in progress)."""
        incomplete = choice is not None and choice.finish_reason == "length"
        body = self.body
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.prepared.model_name,
            "adapter": self.prepared.adapter,
            "output": [] if choice is None else [self.message(choice.text, _item_status(status))],
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
            "tool_choice": body.tool_choice or "auto",
            "tools": [],
            "previous_response_id": None,
            "reasoning": None,
            "store": False,
            "background": False,
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "usage": None if choice is None else self.usage(choice),
            "user": body.user,
            "metadata": {},
        }

    def final_body(self, choices: list[Choice]) -> dict:
        (choice,) = choices
        return self.response(_status(choice), choice)

    def event(self, kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return sse_event(payload)

    def _part(self, text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": []}

    async def stream_events(
        self, engine_stream: EngineStream, include_usage: bool, extra: dict
    ) -> AsyncIterator[str]:
        """``response.created`` … ``response.completed`` (``response.incomplete`` when
        ``max_output_tokens`` ended it); a failure is an ``error`` event, then ``response.failed``."""
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        choice = Choice()
        outputs = engine_stream.outputs()
        try:
            yield self.event("response.created", response=self.response("in_progress"))
            yield self.event("response.in_progress", response=self.response("in_progress"))
            yield self.event(
                "response.output_item.added", output_index=0, item=self.message("", "in_progress")
            )
            yield self.event("response.content_part.added", **where, part=self._part(""))
            async for _, output in outputs:
                choice.add(output)
                if output.error is not None:
                    raise output.error
                if output.text_delta:
                    yield self.event(
                        "response.output_text.delta", **where, delta=output.text_delta, logprobs=[]
                    )
            status = _status(choice)
            yield self.event("response.output_text.done", **where, text=choice.text, logprobs=[])
            yield self.event("response.content_part.done", **where, part=self._part(choice.text))
            yield self.event(
                "response.output_item.done", output_index=0, item=self.message(choice.text, status)
            )
            final = "response.completed" if status == "completed" else "response.incomplete"
            yield self.event(final, response=self.response(status, choice))
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
    """A message's status: a failed response keeps what was generated as an incomplete message."""
    return "incomplete" if status == "failed" else status


def _status(choice: Choice) -> str:
    return "incomplete" if choice.finish_reason == "length" else "completed"


async def create_response(
    state: ServingState, body: ResponsesRequest, request: Request, principal: Principal
):
    prompt_ids = render_chat(state, response_messages(body))
    fields = body.to_sampling_fields()
    prepared = prepare(state, fields, [prompt_ids], body.max_output_tokens, principal, "max_output_tokens")
    return await ResponsesServing(state, prepared, body).respond(request, principal, body.stream)
