"""The seeded request mix every system sees: prompt and output lengths, adapters, arrival times.

Modelled on S-LoRA's and vLLM's serving benchmarks, scaled to a small CPU: prompt lengths are drawn
from U[8, 128] tokens, output lengths from U[8, 64] tokens (fixed per request with ``ignore_eos``),
adapters uniformly or by a power law (S-LoRA's skewed popularity), arrivals closed loop or Poisson.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

Popularity = Literal["uniform", "powerlaw"]


@dataclass(frozen=True)
class WorkloadSpec:
    """What to draw. ``num_adapters = 0`` means every request uses the base model."""

    num_requests: int
    num_adapters: int
    popularity: Popularity = "uniform"
    prompt_tokens: tuple[int, int] = (8, 128)  # inclusive bounds
    output_tokens: tuple[int, int] = (8, 64)
    powerlaw_alpha: float = 1.0  # Zipf exponent: P(adapter i) ∝ 1 / (i + 1) ** alpha
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be at least 1, got {self.num_requests}")
        if self.num_adapters < 0:
            raise ValueError(f"num_adapters must be at least 0, got {self.num_adapters}")
        if self.popularity not in ("uniform", "powerlaw"):
            raise ValueError(f"popularity must be uniform or powerlaw, got {self.popularity!r}")


@dataclass(frozen=True)
class BenchRequest:
    """One request: exact prompt token ids, exact output length, its adapter (None = base)."""

    index: int
    prompt_token_ids: tuple[int, ...]
    output_tokens: int
    adapter: str | None


def adapter_name(i: int) -> str:
    return f"bench-{i:03d}"


def adapter_weights(num_adapters: int, popularity: Popularity, alpha: float) -> list[float]:
    if popularity == "uniform":
        return [1.0] * num_adapters
    return [1.0 / (i + 1) ** alpha for i in range(num_adapters)]


def make_workload(spec: WorkloadSpec, vocab_low: int = 1000, vocab_high: int = 40000) -> list[BenchRequest]:
    """Draws ``spec.num_requests`` requests; the same spec always gives the same requests.

    Prompt tokens are random ids from an ordinary part of the vocabulary (no special tokens), so a
    prompt of ``n`` ids is exactly ``n`` tokens whatever the tokenizer does to text.
    """
    # Two streams: prompts and lengths depend on the seed only, so every system and every number of
    # adapters sees exactly the same prompts and output lengths.
    rng = random.Random(spec.seed)
    adapter_rng = random.Random(spec.seed + 104729)
    names = [adapter_name(i) for i in range(spec.num_adapters)]
    weights = adapter_weights(spec.num_adapters, spec.popularity, spec.powerlaw_alpha)
    requests = []
    for index in range(spec.num_requests):
        prompt_len = rng.randint(*spec.prompt_tokens)
        prompt = tuple(rng.randrange(vocab_low, vocab_high) for _ in range(prompt_len))
        output = rng.randint(*spec.output_tokens)
        adapter = adapter_rng.choices(names, weights)[0] if names else None
        requests.append(BenchRequest(index, prompt, output, adapter))
    return requests


def poisson_arrivals(num_requests: int, rate_per_s: float, seed: int = 0) -> list[float]:
    """Arrival offsets in seconds of a Poisson process at ``rate_per_s`` (exponential gaps)."""
    if rate_per_s <= 0:
        raise ValueError(f"rate_per_s must be positive, got {rate_per_s}")
    rng = random.Random(seed + 7919)
    t, times = 0.0, []
    for _ in range(num_requests):
        times.append(t)
        t += rng.expovariate(rate_per_s)
    return times
