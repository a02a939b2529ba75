"""Wire models of ``POST /v1/responses`` (stateless: nothing is stored, so nothing can be continued).

Fields of OpenAI's Responses API this server does not implement are declared and refused unless they
carry their no-op value, as on the other OpenAI routes; unknown fields are refused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from server.api.chat.protocol import ChatCompletionRequest, ChatMessage
from server.api.sampling_protocol import check_finite, check_text, refuse_unless_no_op

# field -> (its no-op values, why anything else is refused)
_REFUSED: dict[str, tuple[tuple, str]] = {
    "previous_response_id": ((), "previous_response_id needs stored responses; this server stores none"),
    "store": ((False,), "store is not supported: this server keeps no responses (send store=false)"),
    "background": ((False,), "background responses are not supported by this server"),
    "reasoning": ((), "reasoning options are not supported by this server"),
    "include": (([],), "include (extra output data such as logprobs) is not supported yet"),
    "top_logprobs": ((0,), "top_logprobs are not supported by this server yet"),
    "metadata": (({},), "metadata is only kept with store, which this server does not offer"),
    "truncation": (("disabled",), "only truncation='disabled' is supported"),
    "conversation": ((), "conversation needs stored state; this server stores none"),
    "prompt": ((), "prompt templates are not supported by this server"),
    "max_tool_calls": ((), "max_tool_calls is not supported (use parallel_tool_calls=false for one call)"),
}


class TextPart(BaseModel):
    """An ``input_text`` part, or an ``output_text`` part of an earlier answer sent back as history."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["input_text", "output_text"]
    text: str
    annotations: list = Field(default_factory=list)
    logprobs: list | None = None

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        return check_text(v, "text")


class InputMessage(BaseModel):
    """One input item: a message ``{"role", "content"}`` (``type: "message"`` may be given)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    id: str | None = None
    status: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: str | list[TextPart]) -> str | list[TextPart]:
        return check_text(v, "content") if isinstance(v, str) else v

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionCallItem(BaseModel):
    """An earlier answer's ``function_call`` item, sent back as history."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(BaseModel):
    """A tool's result: ``{"type": "function_call_output", "call_id", "output"}``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        return check_text(v, "output")


def _item_type(item: Any) -> str:
    kind = item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", "message")
    return kind if kind in ("function_call", "function_call_output") else "message"


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type),
]


class TextOptions(BaseModel):
    """``text.format``: ``text``, ``json_object`` or ``json_schema`` (``name``, ``schema``, ``strict``)."""

    model_config = ConfigDict(extra="forbid")

    format: dict[str, Any] | None = None
    verbosity: Literal["medium"] | None = None

    def response_format(self) -> dict[str, Any] | None:
        """The format in chat's ``response_format`` shape, which the shared grammar code reads."""
        fmt = self.format
        if fmt is None or fmt.get("type") != "json_schema":
            return fmt
        inner = {key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt}
        return {"type": "json_schema", "json_schema": inner}


def chat_tool(tool: Any) -> Any:
    """A Responses function tool (``{"type", "name", "parameters", ...}``) in chat's nested shape.

    Anything else is passed on unchanged, for the chat tool checks to refuse by index."""
    if not isinstance(tool, dict) or tool.get("type") != "function" or "function" in tool:
        return tool
    return {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}


def chat_tool_choice(choice: Any) -> Any:
    """``{"type": "function", "name"}`` in chat's ``{"type": "function", "function": {"name"}}``."""
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def chat_history(items: list[InputMessage | FunctionCallItem | FunctionCallOutputItem]) -> list[ChatMessage]:
    """Input items as chat messages: function calls join the assistant turn before them (or open one),
    function outputs become ``tool`` turns, as chat's tool history renders them."""
    messages: list[ChatMessage] = []
    for item in items:
        if isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function"}
            call["function"] = {"name": item.name, "arguments": item.arguments}
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        elif isinstance(item, FunctionCallOutputItem):
            messages.append(ChatMessage(role="tool", tool_call_id=item.call_id, content=item.output))
        else:
            messages.append(ChatMessage(role=item.role, content=item.text()))
    return messages


class ResponsesRequest(BaseModel):
    """``POST /v1/responses``: ``input`` (a string or messages), ``instructions`` and sampling."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    adapter: str | dict[str, Any] | None = Field(None, description="LoRA adapter name, or a merge spec")
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    stream: bool = False
    text: TextOptions | None = None
    user: str | None = None
    parallel_tool_calls: bool | None = None
    service_tier: Literal["auto", "default"] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    previous_response_id: Any = None
    store: Any = None
    background: Any = None
    reasoning: Any = None
    include: Any = None
    top_logprobs: Any = None
    metadata: Any = None
    truncation: Any = None
    conversation: Any = None
    prompt: Any = None
    max_tool_calls: Any = None

    @field_validator("input")
    @classmethod
    def _input(cls, v: str | list) -> str | list:
        return check_text(v, "input") if isinstance(v, str) else v

    @field_validator("adapter")
    @classmethod
    def _adapter_text(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        return check_text(v, "adapter") if isinstance(v, str) else v

    @field_validator("model", "user", "instructions")
    @classmethod
    def _plain_text(cls, v: str | None, info) -> str | None:
        return None if v is None else check_text(v, info.field_name)

    @field_validator("temperature", "top_p")
    @classmethod
    def _finite(cls, v: float) -> float:
        return check_finite(v)

    @field_validator(*_REFUSED)
    @classmethod
    def _unsupported(cls, value: Any, info) -> Any:
        return refuse_unless_no_op(value, info.field_name, _REFUSED)

    def to_chat_request(self) -> ChatCompletionRequest:
        """The request in chat completions' terms: one conversion, so the conversation, the tools and
        the output format go through exactly the chat path (template, tool format, grammars)."""
        turns = [ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        if isinstance(self.input, str):
            turns.append(ChatMessage(role="user", content=self.input))
        else:
            turns.extend(chat_history(self.input))
        return ChatCompletionRequest(
            messages=turns,
            model=self.model,
            adapter=self.adapter,
            temperature=self.temperature,
            top_p=self.top_p,
            user=self.user,
            tools=[chat_tool(t) for t in self.tools] if self.tools else None,
            tool_choice=chat_tool_choice(self.tool_choice),
            parallel_tool_calls=self.parallel_tool_calls,
            response_format=self.text.response_format() if self.text else None,
        )


# chat's names for the output format's fields -> the Responses request's names
CHAT_FORMAT_PARAMS = {
    "response_format.json_schema.schema": "text.format.schema",
    "response_format.json_schema": "text.format",
    "response_format.type": "text.format.type",
    "response_format": "text.format",
}


def responses_param(param: str) -> str:
    """A chat-side error's ``param`` as the Responses request names the field."""
    return CHAT_FORMAT_PARAMS.get(param, param)
