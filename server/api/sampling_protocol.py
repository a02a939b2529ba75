"""The wire fields chat and text completions share (sampling, adapters, refused parameters)."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_SEQUENCES = 4
MAX_LOGPROBS = 20  # alternatives per token (OpenAI: 20 in chat, 5 in completions)
MAX_LOGIT_BIAS_ENTRIES = 1024
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what a torch generator accepts


def check_finite(value: float | None) -> float | None:
    """Refuses NaN and infinities (None passes: the field was not given)."""
    if value is not None and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def refuse_unless_no_op(value: Any, field: str, refused: dict[str, tuple[tuple, str]]) -> Any:
    """``value`` if absent or one of ``refused[field]``'s no-op values (same type too: False is not
    0); else a ValueError with the refusal's reason. Every route's table of refused parameters
    goes through this one check."""
    no_ops, reason = refused[field]
    if value is None or any(value == v and type(value) is type(v) for v in no_ops):
        return value
    raise ValueError(reason)


def check_text(value: str, field: str) -> str:
    """Refuses text that cannot be tokenized safely: lone surrogates and NUL characters."""
    if "\x00" in value:
        raise ValueError(f"{field} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{field} is not valid Unicode (lone surrogate)") from e
    return value


def check_stops(value: str | list[str] | None) -> list[str]:
    """Stop sequences as a list: at most :data:`MAX_STOP_SEQUENCES`, none empty, all safe text."""
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
    for stop in stops:
        if not stop:
            raise ValueError("stop sequences must not be empty")
        check_text(stop, "stop")
    return stops


# Parameters OpenAI defines that this server does not implement: refused (a 400 naming the field)
# unless they carry a value that changes nothing. field -> (its no-op values, why it is refused)
_REFUSED: dict[str, tuple[tuple, str]] = {
    "best_of": ((1,), "best_of is not supported by this server; use n"),
    "store": ((False,), "store is not supported: this server keeps no completions"),
    "metadata": (({},), "metadata is only kept with store, which this server does not offer"),
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The parameters shared by chat and text completions.

    Unknown fields are refused, as OpenAI refuses them ("Unrecognized request argument"): a parameter
    the server would silently ignore is a 400 naming it. Parameters OpenAI defines that this server
    does not implement are declared and refused unless they carry their no-op value.
    """

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    adapter: str | dict[str, Any] | None = Field(
        None,
        description="LoRA adapter name (null = the base model), or a merge spec "
        '{"merge": [{"name", "weight"}...], "method", "density", "majority_sign_method"}',
    )
    merged_adapters: dict[str, Any] | None = Field(
        None, description="LoRAX's merge form: {ids, weights, merge_strategy, density, majority_sign_method}"
    )
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = -1
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    stop: str | list[str] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    store: Any = None
    metadata: Any = None
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (as a string) -> bias in [-100, 100] added to its logit"
    )
    best_of: Any = None
    response_format: dict[str, Any] | None = Field(
        None, description='{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}'
    )
    structured_outputs: dict[str, Any] | None = Field(
        None, description="vLLM's form: one of {json, regex, choice, grammar}"
    )
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if not v:
            return v
        if len(v) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"at most {MAX_LOGIT_BIAS_ENTRIES} entries are allowed")
        for key, bias in v.items():
            if not key.isdigit() or len(key) > 9:
                raise ValueError(f"keys must be token ids, got {key[:20]!r}")
            if not (math.isfinite(bias) and -100 <= bias <= 100):
                raise ValueError(f"biases must be in [-100, 100], got {bias} for token {key}")
        return v

    def output_constraint(self):
        """The grammar the output must follow (a GrammarSpec), or None for free text."""
        from server.api.structured_outputs import grammar_spec

        return grammar_spec(self)

    def logprob_options(self) -> tuple[int | None, int | None]:
        """(alternatives per generated token, per prompt token); None where not asked."""
        return None, None

    @field_validator("model", "user")
    @classmethod
    def _plain_text(cls, v: str | None, info) -> str | None:
        return None if v is None else check_text(v, info.field_name)

    @field_validator("adapter")
    @classmethod
    def _adapter_text(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        return check_text(v, "adapter") if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        return check_stops(v)

    @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty")
    @classmethod
    def _finite(cls, v: float) -> float:
        return check_finite(v)

    @field_validator(*_REFUSED)
    @classmethod
    def _unsupported(cls, value: Any, info) -> Any:
        return refuse_unless_no_op(value, info.field_name, _REFUSED)
