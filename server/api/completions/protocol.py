"""Wire models of ``POST /v1/completions``."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from server.api.sampling_protocol import SamplingFields, check_text


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[int], Field(min_length=1)]
    echo: bool = False
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

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported_completion(cls, value: bool | str | None, info) -> bool | str | None:
        if value:
            raise ValueError(f"{info.field_name} is not supported by this server yet")
        return value
