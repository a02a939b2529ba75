"""Wire models of ``POST /v1/completions``."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from server.api.sampling_protocol import MAX_LOGPROBS, SamplingFields, check_text

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    max_tokens: Annotated[int, Field(ge=0)] | None = None  # 0 with echo: score the prompt only
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list) -> str | list:
        if isinstance(v, str):
            return check_text(v, "prompt")
        for item in v:
            if isinstance(item, str):
                check_text(item, "prompt")
        return v

    @field_validator("suffix")
    @classmethod
    def _unsupported_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (insertion) is not supported by this server")
        return value

    def logprob_options(self) -> tuple[int | None, int | None]:
        """Completions' ``logprobs: k`` asks for the sampled token plus k alternatives; with ``echo``
        the prompt's tokens too."""
        if self.logprobs is None:
            return None, None
        return self.logprobs, (self.logprobs if self.echo else None)
