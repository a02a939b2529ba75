"""What the API hands the engine and what the engine hands back (dataclasses, no HTTP)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapters.lease import AdapterLease

MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy (dividing logits by it would overflow)


class ContextLengthExceeded(ValueError):
    """The prompt plus ``max_tokens`` does not fit the model's context window."""

    code = "context_length_exceeded"
    param = "messages"

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int, virtual_tokens: int = 0):
        adapter = f", of which {virtual_tokens} are the adapter's virtual tokens" if virtual_tokens else ""
        super().__init__(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt{adapter}, {max_tokens} for "
            "the completion). Please reduce the prompt or max_tokens."
        )


class EngineUnavailable(RuntimeError):
    """The engine is not running (starting up, shutting down, or failed)."""

    code = "engine_unavailable"
    param = None


class GenerationFailed(RuntimeError):
    """A failure inside the engine for one request; the engine carries on with the others."""

    code = "generation_failed"
    param = None


class NonFiniteLogits(GenerationFailed):
    """One row's next-token scores became NaN or infinite; that request fails, the batch goes on."""

    code = "non_finite_logits"

    def __init__(self, adapter: str | None):
        on = f"the adapter '{adapter}'" if adapter else "the base model"
        super().__init__(
            f"Generation stopped: the model's scores for the next token became NaN or infinite on {on} "
            "(extreme adapter weights or activations). Other requests are unaffected."
        )
        self.adapter = adapter


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
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), applied in float32
    logprobs: int | None = None  # None: none; k >= 0: each sampled token's logprob and the k most likely
    prompt_logprobs: int | None = None  # likewise for every prompt token after the first (echo)
    # a compiled grammar (server.engine.structured.CompiledGrammar): each row gets its own matcher
    grammar: Any = field(default=None, compare=False)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


@dataclass
class GenerationRequest:
    """One sequence to generate, with its share of the lease on its adapter (the base by default).

    The engine owns the lease share from :meth:`LLMEngine.submit` on and releases it exactly once,
    when the sequence finishes (or when the submission is refused).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    lease: AdapterLease = field(default_factory=AdapterLease.base)
    # the prefix cache's salt: rows share cached prompt blocks only within one salt (the API sets the
    # tenant's key name, so one tenant never sees another's prompts through a faster first token);
    # None bypasses the cache
    cache_salt: str | None = ""

    @property
    def adapter(self) -> str | None:
        return self.lease.name

    @property
    def adapter_slot(self) -> int:
        return self.lease.slot


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the row's model (its adapter or merge), before any sampling
    transform (penalties, bias, temperature, top-k/top-p), and the ``top`` most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass
class GenerationOutput:
    """An update for one request: new text since the last update, and the final state when finished."""

    request_id: str
    text_delta: str = ""
    # The tokens generated since the previous output (an EOS that ended the sequence included); the
    # text may lag them while a partial stop string or UTF-8 character is held back.
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "error" | "cancelled"
    stop_sequence: str | None = None  # the stop string that ended it ("stop" without one: EOS)
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    completion_tokens: int = 0
    error: BaseException | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens since the last output
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1.. (first output only)
    eos_logprob: TokenLogprob | None = None  # of the EOS that ended it (not part of the output text)


@dataclass
class EngineHealth:
    alive: bool
    seconds_since_step: float
    running: int
    waiting: int
    running_adapters: tuple[str, ...] = ()  # distinct adapters of the running batch (merges too)
    waiting_adapters: tuple[str, ...] = ()  # distinct adapters of the sequences waiting to join it


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    generated_tokens: int = 0
    finished: int = 0
    finished_by_reason: dict[str, int] = field(default_factory=dict)  # stop, length, cancelled, error
    prefill_forwards: int = 0
    prefill_seconds: float = 0.0  # engine time in prefill forward passes
    decode_seconds: float = 0.0  # engine time in decode forward passes
    decode_rows: int = 0  # summed batch size of the decode steps (÷ steps = mean batch)
