"""Wire models of ``POST /v1/embeddings`` (OpenAI's shape)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from server.api.sampling_protocol import check_text

TokenIds = list[StrictInt]


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request; unknown fields are refused rather than ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="the embedding model's id or one of its aliases")
    input: StrictStr | list[StrictStr] | TokenIds | list[TokenIds] = Field(
        description="a text, a list of texts, a list of token ids, or a list of token-id lists "
        "(ids of the embedding model's own tokenizer)"
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    @field_validator("input", mode="wrap")
    @classmethod
    def _input(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        try:
            value = handler(value)
        except ValidationError:  # one message for the four shapes, not one per union member
            raise ValueError(
                "input must be a string, a list of strings, a list of token ids or a list of token-id lists"
            ) from None
        texts = [value] if isinstance(value, str) else value
        for text in texts:
            if isinstance(text, str):
                check_text(text, "input")
        return value

    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs as a list of texts or a list of token-id lists."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if value and all(isinstance(item, int) for item in value):
            return [list(value)]
        return list(value)


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
