"""Wire models of ``/tokenize`` and ``/detokenize`` (vLLM's shape; unknown fields are refused)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from server.api.chat.protocol import ChatMessage, ToolFields
from server.api.sampling_protocol import check_text


class TokenizeRequest(ToolFields):
    """Either ``prompt`` (with ``add_special_tokens``) or ``messages`` (with ``add_generation_prompt``
    and, as chat, ``tools`` / ``tool_choice`` / legacy ``functions``, rendered as chat renders them)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="the base model or an adapter (same tokenizer); absent: base")
    prompt: str | None = None
    add_special_tokens: bool | None = Field(
        None, description="with prompt: add the tokenizer's special tokens (default false, as completions do)"
    )
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool | None = Field(
        None, description="with messages: end with the assistant turn's opening (default true, as chat does)"
    )

    @model_validator(mode="after")
    def _one_form(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of 'prompt' and 'messages'")
        if self.prompt is not None:
            check_text(self.prompt, "prompt")
            if self.add_generation_prompt is not None:
                raise ValueError("add_generation_prompt applies to 'messages', not to 'prompt'")
            given = [f for f in ("tools", "tool_choice", "functions", "function_call") if getattr(self, f)]
            if given:
                raise ValueError(f"{given[0]} applies to 'messages', not to 'prompt'")
        elif self.add_special_tokens is not None:
            raise ValueError("add_special_tokens applies to 'prompt', not to 'messages'")
        return self


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[StrictInt]


class DetokenizeResponse(BaseModel):
    prompt: str
