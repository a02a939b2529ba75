"""Sampling one step's rows together: each row's scores, one grammar mask for every constrained row, tokens.

Structured outputs per row inside a heterogeneous batch (issue 12): the constrained rows' masks are
filled in one llguidance call (across its executor's threads) into a bitmask allocated once, and
applied in one vectorised call to those rows' scores only. A free row's work is what it was alone:
its own scores and its own pick; it pays nothing for the constrained rows beside it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from server.engine.sampling import pick_token, row_scores
from server.engine.structured.row_grammar import GrammarRowFailed, RowGrammar, fill_masks
from server.engine.structured.token_mask import allocate_bitmask, apply_token_bitmask_
from server.engine.types import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class RowToSample:
    """One row of a step: the model's raw logits ``(V,)`` and what its request samples with."""

    logits: torch.Tensor
    output_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    adapter: str | None = None
    grammar: RowGrammar | None = None


class StepSampler:
    """Samples a step's rows; owns the grammar bitmask ``(max_rows, words)`` reused by every step.

    Used by the engine thread only. The bitmask, the constrained rows' score buffer and llguidance's
    executor are made on the first step that has a constrained row (a server that never sees a grammar
    never allocates them).

    Args:
        max_rows: the most rows a step can have (the engine's ``max_running``).
        mask_threads: llguidance executor threads for the mask fill; None is a quarter of the CPUs
            (1 to 8): the fill is ~25 µs a row against milliseconds of model compute on the same
            cores, and on a loaded 2-core machine a 2-thread pool made the fill 3x slower (0.8 →
            2.3 ms for 32 rows) by waiting on descheduled workers.
    """

    def __init__(self, max_rows: int, mask_threads: int | None = None):
        if max_rows < 1:
            raise ValueError(f"max_rows must be positive, got {max_rows}")
        if mask_threads is not None and mask_threads < 1:
            raise ValueError(f"mask_threads must be positive, got {mask_threads}")
        self.max_rows = max_rows
        self.mask_threads = mask_threads
        self._bitmask: torch.Tensor | None = None  # (max_rows, words) int32, CPU
        self._scores: torch.Tensor | None = None  # (max_rows, V) float32 on the logits' device
        self._executor: Any = None  # llguidance.LLExecutor

    def sample(self, rows: list[RowToSample]) -> list[int | Exception]:
        """Each row's next token, or the exception that fails that row alone.

        A row's outcome is what :func:`server.engine.sampling.sample_row` gives it on its own:
        ``NonFiniteLogits`` for non-finite scores, ``GrammarRowFailed`` when its grammar cannot go on.
        """
        if len(rows) > self.max_rows:
            raise ValueError(f"a step of {len(rows)} rows is over max_rows {self.max_rows}")
        outcomes: list[int | Exception | torch.Tensor] = []
        for row in rows:
            try:
                outcomes.append(row_scores(row.logits, row.output_ids, row.params, row.adapter))
            except Exception as e:  # noqa: BLE001 - handed to the engine, which fails this row only
                outcomes.append(e)
        constrained = [
            i
            for i, row in enumerate(rows)
            if row.grammar is not None and isinstance(outcomes[i], torch.Tensor)
        ]
        masked = self._mask_constrained(rows, outcomes, constrained) if constrained else {}
        for i, row in enumerate(rows):
            scores = masked.get(i, outcomes[i])
            if isinstance(scores, torch.Tensor):
                try:
                    outcomes[i] = pick_token(scores, row.params, row.generator, row.adapter)
                except Exception as e:  # noqa: BLE001 - as above
                    outcomes[i] = e
            else:
                outcomes[i] = scores
        return outcomes  # type: ignore[return-value]  # every tensor has been replaced by its token

    def _mask_constrained(
        self, rows: list[RowToSample], outcomes: list, constrained: list[int]
    ) -> dict[int, torch.Tensor | Exception]:
        """The constrained rows' masked scores (views of one buffer), or their grammar failures."""
        grammars = [rows[i].grammar for i in constrained]
        first = outcomes[constrained[0]]
        bitmask, buffer = self._buffers(grammars[0].vocab.vocab_size, first.shape[-1], first.device)
        failed = set(fill_masks(grammars, bitmask, self._executor))
        scores = buffer[: len(constrained)]  # (R, V)
        torch.stack([outcomes[i] for i in constrained], out=scores)
        apply_token_bitmask_(scores, bitmask[: len(constrained)])
        return {
            i: GrammarRowFailed(grammars[j].error or "the grammar failed") if j in failed else scores[j]
            for j, i in enumerate(constrained)
        }

    def _buffers(
        self, grammar_vocab: int, logits_width: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The bitmask and score buffer, made once (again only if the logits' width or device changes)."""
        if self._executor is None:
            import llguidance

            threads = self.mask_threads or max(1, min(8, (os.cpu_count() or 1) // 4))
            self._executor = llguidance.LLExecutor(threads)
        if self._bitmask is None or self._bitmask.shape[1] * 32 < grammar_vocab:
            self._bitmask = allocate_bitmask(self.max_rows, grammar_vocab)
        if self._scores is None or self._scores.shape[1] != logits_width or self._scores.device != device:
            self._scores = torch.empty(self.max_rows, logits_width, dtype=torch.float32, device=device)
            logger.debug("step sampler: %d x %d grammar buffers on %s", self.max_rows, logits_width, device)
        return self._bitmask, self._scores
