"""Wire models of ``POST /v1/responses`` (stateless: nothing is stored, so nothing can be continued).

Fields of OpenAI's Responses API this server does not implement are declared and refused unless they
carry their no-op value, as on the other OpenAI routes; unknown fields are refused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.api.sampling_protocol import SamplingFields, check_finite, check_text, refuse_unless_no_op

# field -> (its no-op values, why anything else is refused)
_REFUSED: dict[str, tuple[tuple, str]] = {
    "previous_response_id": ((), "previous_response_id needs stored responses; this server stores none"),
    "store": ((False,), "store is not supported: this server keeps no responses (send store=false)"),
    "background": ((False,), "background responses are not supported by this server"),
    "tools": (([],), "tools (function calling) are not supported by this server yet"),
    "tool_choice": (("none", "auto"), "tool_choice needs tools, which this server does not support yet"),
    "reasoning": ((), "reasoning options are not supported by this server"),
    "include": (([],), "include (extra output data such as logprobs) is not supported yet"),
    "top_logprobs": ((0,), "top_logprobs are not supported by this server yet"),
    "metadata": (({},), "metadata is only kept with store, which this server does not offer"),
    "truncation": (("disabled",), "only truncation='disabled' is supported"),
    "conversation": ((), "conversation needs stored state; this server stores none"),
    "prompt": ((), "prompt templates are not supported by this server"),
    "max_tool_calls": ((), "max_tool_calls needs tools, which this server does not support yet"),
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


class TextOptions(BaseModel):
    """``text``: only plain text output (``format: {"type": "text"}``) until structured outputs land."""

    model_config = ConfigDict(extra="forbid")

    format: Any = None
    verbosity: Literal["medium"] | None = None

    @field_validator("format")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if v is not None and v != {"type": "text"}:
            raise ValueError("only {'type': 'text'} is supported (structured outputs are not supported yet)")
        return v


class ResponsesRequest(BaseModel):
    """``POST /v1/responses``: ``input`` (a string or messages), ``instructions`` and sampling."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    adapter: str | dict[str, Any] | None = Field(None, description="LoRA adapter name, or a merge spec")
    input: str | Annotated[list[InputMessage], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    stream: bool = False
    text: TextOptions | None = None
    user: str | None = None
    parallel_tool_calls: bool | None = None
    service_tier: Literal["auto", "default"] | None = None
    previous_response_id: Any = None
    store: Any = None
    background: Any = None
    tools: Any = None
    tool_choice: Any = None
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
    def _input(cls, v: str | list[InputMessage]) -> str | list[InputMessage]:
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

    def to_sampling_fields(self) -> SamplingFields:
        """The adapter and sampling fields in the shared conversion path's terms."""
        return SamplingFields(
            model=self.model,
            adapter=self.adapter,
            temperature=self.temperature,
            top_p=self.top_p,
            user=self.user,
        )
