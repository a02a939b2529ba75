"""Iteration-level scheduling: a waiting queue and a running batch that sequences join and leave per step."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from server.engine.types import GenerationOutput, GenerationRequest


@dataclass(eq=False)
class Sequence:
    """A request's state inside the engine."""

    request: GenerationRequest
    emit: Callable[[GenerationOutput], None]
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    text_sent: str = ""
    ids_sent: int = 0  # how many of output_ids have been reported in an output's token_ids
    row: int | None = None  # its row in the KV cache while running
    cancelled: bool = False
    finished: bool = False
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    pending_logprobs: list = field(default_factory=list)  # TokenLogprobs not yet sent
    prompt_logprobs: list | None = None  # sent with the first output, then None
    grammar: Any = None  # this row's RowGrammar when its output is constrained
    cached_prompt_tokens: int = 0  # prompt tokens its prefill took from the prefix cache
    # chunked prefill: its earlier chunks' result while it waits for the next (a runner ``Prefilled``),
    # and how many prompt tokens the pass it is in computes (None: all that are left)
    partial: Any = None
    chunk_limit: int | None = None

    def prompt_tokens_left(self) -> int:
        done = 0 if self.partial is None else self.partial.prompt_tokens
        return len(self.request.prompt_token_ids) - done

    @property
    def request_id(self) -> str:
        return self.request.request_id


class Scheduler:
    """Decides which sequences run at the next step.

    Args:
        max_running: the most sequences decoded together (the batch size cap).
        max_prefills_per_step: how many waiting sequences are packed into one prefill forward pass
            (before a decode step, or in the prefill worker while the engine thread decodes).
    """

    def __init__(self, max_running: int, max_prefills_per_step: int):
        self.max_running = max_running
        self.max_prefills_per_step = max_prefills_per_step
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # index i == row i of the KV cache

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def next_prefills(self, room: int, token_budget: int | None = None) -> list[Sequence]:
        """Up to ``max_prefills_per_step`` waiting sequences (at most ``room``) to prefill together.

        With a ``token_budget`` (chunked prefill), the pass computes at most that many prompt tokens:
        each sequence taken gets its ``chunk_limit``, and a prompt longer than what is left of the
        budget is prefilled in chunks over several passes (it goes back to the queue's end in between,
        so short prompts behind it are not held up). A prompt asking for prompt logprobs is never
        split: it is taken whole, first in a pass or where it fits.

        Cancelled ones are taken too (the engine finishes them when their prefill returns); a
        sequence cancelled while still queued is removed by the engine at once.
        """
        batch: list[Sequence] = []
        budget = token_budget
        while self.waiting and len(batch) < min(room, self.max_prefills_per_step):
            seq = self.waiting[0]
            left = seq.prompt_tokens_left()
            if budget is None:
                seq.chunk_limit = None
            elif seq.request.sampling.prompt_logprobs is not None:
                if batch and left > budget:
                    break
                seq.chunk_limit = None
                budget -= left
            elif budget <= 0:
                break
            else:
                seq.chunk_limit = min(left, budget)
                budget -= seq.chunk_limit
            batch.append(self.waiting.popleft())
        return batch

    def join(self, seq: Sequence, row: int) -> None:
        if row != len(self.running):
            raise RuntimeError(f"KV row {row} does not match running index {len(self.running)}")
        seq.row = row
        self.running.append(seq)

    def leave(self, seq: Sequence, moved_from: int | None) -> None:
        """Removes ``seq`` from the batch; the sequence at ``moved_from`` takes its row (swap-remove)."""
        row = seq.row
        last = self.running.pop()
        if moved_from is not None and last is not seq:
            self.running[row] = last
            last.row = row
        seq.row = None
