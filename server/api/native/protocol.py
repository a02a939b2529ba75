"""Wire models of LoRAX's and TGI's native routes (``/generate``, ``/generate_stream``, ``/``).

Both clients send every parameter they know, most of them ``null``: a parameter this server cannot
honour is accepted only at its no-op value and otherwise refused with a 400 naming it.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.api.sampling_protocol import (
    SEED_MAX,
    SamplingFields,
    check_finite,
    check_stops,
    check_text,
    refuse_unless_no_op,
)

# field -> (its no-op values, why anything else is refused)
_REFUSED: dict[str, tuple[tuple, str]] = {
    "repetition_penalty": ((1.0, 1), "repetition_penalty is not supported by this server yet"),
    "decoder_input_details": ((False,), "decoder_input_details (prompt logprobs) are not supported yet"),
    "response_format": ((), "response_format (structured output) is not supported by this server yet"),
    "grammar": ((), "grammar (structured output) is not supported by this server yet"),
    "watermark": ((False,), "watermark is not supported by this server"),
    "top_n_tokens": ((0,), "top_n_tokens needs token logprobs, which this server does not report yet"),
    "return_k_alternatives": ((0,), "return_k_alternatives needs token logprobs, not reported yet"),
    "best_of": ((1,), "best_of is not supported by this server"),
    "typical_p": ((1.0,), "typical_p is not supported by this server"),
    "truncate": ((), "truncate is not supported: send a prompt that fits the context window"),
    "api_token": ((), "api_token is for hub adapters; this server loads adapters from its own store only"),
}


class NativeParameters(BaseModel):
    """TGI's ``parameters`` with LoRAX's adapter fields."""

    model_config = ConfigDict(extra="forbid")

    adapter_id: str | None = None
    adapter_source: str | None = None
    merged_adapters: dict[str, Any] | None = None
    do_sample: bool = False
    max_new_tokens: Annotated[int, Field(ge=1)] | None = None
    ignore_eos_token: bool = False
    return_full_text: bool = False
    stop: list[str] = Field(default_factory=list)
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_k: Annotated[int, Field(ge=1)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    details: bool = False
    repetition_penalty: Any = None
    decoder_input_details: Any = None
    response_format: Any = None
    grammar: Any = None
    watermark: Any = None
    top_n_tokens: Any = None
    return_k_alternatives: Any = None
    best_of: Any = None
    typical_p: Any = None
    truncate: Any = None
    api_token: Any = None

    @field_validator("adapter_id")
    @classmethod
    def _adapter_text(cls, v: str | None) -> str | None:
        return None if v is None else check_text(v, "adapter_id")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str]) -> list[str]:
        return check_stops(v)

    @field_validator("adapter_source")
    @classmethod
    def _local_only(cls, v: str | None) -> str | None:
        if v not in (None, "local"):
            raise ValueError(
                f"adapter_source '{v}' is not supported: this server has no hub or S3 access and serves "
                "the adapters in its own store (send 'local' or leave it out)"
            )
        return v

    @field_validator("temperature", "top_p", "frequency_penalty")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        return check_finite(v)

    @field_validator(*_REFUSED)
    @classmethod
    def _unsupported(cls, value: Any, info) -> Any:
        return refuse_unless_no_op(value, info.field_name, _REFUSED)

    @model_validator(mode="after")
    def _one_adapter_form(self) -> NativeParameters:
        if self.adapter_id is not None and self.merged_adapters is not None:
            raise ValueError("send either adapter_id or merged_adapters, not both")
        return self

    @property
    def samples(self) -> bool:
        """TGI's rule: sampling when ``do_sample`` or any sampling parameter is set; else greedy."""
        return self.do_sample or any(v is not None for v in (self.temperature, self.top_k, self.top_p))

    def to_sampling_fields(self) -> SamplingFields:
        """The same parameters in the OpenAI routes' terms, for the shared conversion path."""
        if not self.samples:
            temperature = 0.0
        else:
            temperature = 1.0 if self.temperature is None else self.temperature
        return NativeSamplingFields(
            adapter=self.adapter_id,
            merged_adapters=self.merged_adapters,
            temperature=temperature,
            top_p=self.top_p or 1.0,
            top_k=self.top_k or -1,
            seed=self.seed,
            stop=self.stop,
            frequency_penalty=self.frequency_penalty or 0.0,
            ignore_eos=self.ignore_eos_token,
        )


class NativeSamplingFields(SamplingFields):
    """TGI reports every generated token's logprob (in ``details`` and in stream events)."""

    def logprob_options(self) -> tuple[int | None, int | None]:
        return 0, None


class GenerateRequest(BaseModel):
    """``{"inputs", "parameters", "stream"}``; ``stream`` picks the answer's form on ``POST /``."""

    model_config = ConfigDict(extra="forbid")

    inputs: Annotated[str, Field(min_length=1)]
    parameters: NativeParameters = Field(default_factory=NativeParameters)
    stream: bool = False

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, v: str) -> str:
        return check_text(v, "inputs")

    @field_validator("parameters", mode="before")
    @classmethod
    def _no_parameters(cls, v: Any) -> Any:
        return {} if v is None else v
