"""Summaries of a run: throughput, TTFT, inter-token and end-to-end latency percentiles."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol


class TimedRequest(Protocol):
    output_tokens: int
    error: str | None

    @property
    def ttft_s(self) -> float | None: ...

    @property
    def e2e_s(self) -> float: ...

    def inter_token_s(self) -> list[float]: ...


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0–100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(records: Sequence[TimedRequest], wall_s: float) -> dict:
    """The issue's metrics for one run of one system (latencies in milliseconds)."""
    ok = [r for r in records if r.error is None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [gap for r in ok for gap in r.inter_token_s()]
    e2e = [r.e2e_s for r in ok]
    # Time per output token after the first (vLLM's TPOT): one value per request.
    tpot = [
        (r.e2e_s - r.ttft_s) / (r.output_tokens - 1)
        for r in ok
        if r.ttft_s is not None and r.output_tokens > 1
    ]
    tokens = sum(r.output_tokens for r in ok)

    def ms(values: list[float], q: float) -> float | None:
        p = percentile(values, q)
        return None if p is None else round(p * 1e3, 2)

    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "first_error": next((r.error for r in records if r.error), None),
        "wall_s": round(wall_s, 3),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall_s, 3) if wall_s > 0 else 0.0,
        "requests_per_s": round(len(ok) / wall_s, 4) if wall_s > 0 else 0.0,
        "ttft_ms_p50": ms(ttft, 50),
        "ttft_ms_p99": ms(ttft, 99),
        "itl_ms_p50": ms(itl, 50),
        "itl_ms_p99": ms(itl, 99),
        "tpot_ms_p50": ms(tpot, 50),
        "tpot_ms_p99": ms(tpot, 99),
        "e2e_ms_p50": ms(e2e, 50),
        "e2e_ms_p99": ms(e2e, 99),
    }
