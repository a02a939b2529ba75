"""What the API hands the engine and what the engine hands back (dataclasses, no HTTP)."""

from __future__ import annotations

from dataclasses import dataclass, field


class ContextLengthExceeded(ValueError):
    """The prompt plus ``max_tokens`` does not fit the model's context window."""

    code = "context_length_exceeded"
    param = "messages"

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int):
        super().__init__(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
            "completion). Please reduce the prompt or max_tokens."
        )


class EngineUnavailable(RuntimeError):
    """The engine is not running (starting up, shutting down, or failed)."""

    code = "engine_unavailable"
    param = None
    http_status = 503


class GenerationFailed(RuntimeError):
    """A failure inside the engine for one request; the engine carries on with the others."""

    code = "generation_failed"
    param = None
    http_status = 503


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop (OpenAI's parameters, validated at the API edge)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False  # benchmarks fix output lengths with this

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationRequest:
    """One sequence to generate. ``adapter`` is None for the base model."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    adapter: str | None = None
    adapter_slot: int = 0  # set once the registry has made the adapter resident


@dataclass
class GenerationOutput:
    """An update for one request: new text since the last update, and the final state when finished."""

    request_id: str
    text_delta: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "error" | "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: BaseException | None = None
