"""Wire models of ``POST /v1/chat/completions`` (OpenAI's shapes plus ``adapter`` and ``rag``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.api.chat.tool_format import ToolFormatError, tool_call_grammar
from server.api.collections.protocol import RagOptions
from server.api.sampling_protocol import MAX_LOGPROBS, SamplingFields, check_text


class TextPart(BaseModel):
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        return check_text(v, "text")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls (OpenAI's shape)
    tool_call_id: str | None = None  # a tool turn: which call it answers

    @model_validator(mode="after")
    def _needs_content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant turn with tool_calls may omit it)")
        return self

    @field_validator("content")
    @classmethod
    def _content(cls, v: str | list[TextPart]) -> str | list[TextPart]:
        if isinstance(v, str):
            check_text(v, "content")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ToolFields(BaseModel):
    """The fields that put tools into a rendered conversation: chat completions and ``/tokenize`` both
    have them, so a tokenized conversation counts the tokens its chat completion's prompt has."""

    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None  # legacy: mapped onto tools
    function_call: str | dict[str, Any] | None = None  # legacy: mapped onto tool_choice

    def effective_tools(self) -> tuple[list[dict[str, Any]], Any]:
        """(tools, tool_choice), the legacy ``functions``/``function_call`` mapped onto them.

        Raises:
            ToolFormatError: both forms at once, or a tool_choice other than none/auto without tools.
        """
        if self.functions:
            if self.tools:
                raise ToolFormatError("functions", "send tools or the legacy functions, not both")
            tools = [{"type": "function", "function": f} for f in self.functions]
            call = self.function_call
            choice = {"type": "function", "function": call} if isinstance(call, dict) else (call or "auto")
            return tools, choice
        if not self.tools and self.tool_choice not in (None, "none", "auto"):
            raise ToolFormatError("tool_choice", "tool_choice needs tools")
        return list(self.tools or []), (self.tool_choice if self.tool_choice is not None else "auto")

    def uses_tools(self) -> bool:
        tools, choice = self.effective_tools()
        return bool(tools) and choice != "none"


class ChatCompletionRequest(SamplingFields, ToolFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    rag: RagOptions | None = Field(None, description="retrieve passages from a RAG collection first")
    logprobs: bool | None = Field(None, description="return each output token's log-probability")
    parallel_tool_calls: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int | None, info) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    def logprob_options(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0, None) if self.logprobs else (None, None)

    def output_constraint(self):
        tools, choice = self.effective_tools()
        if not tools or choice == "none":
            return super().output_constraint()
        if super().output_constraint() is not None:
            raise ToolFormatError("response_format", "send tools or an output constraint, not both")
        return tool_call_grammar(tools, choice, self.parallel_tool_calls is not False)
