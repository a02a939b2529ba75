"""One generating row's grammar state: which tokens it may sample next, and what it has written."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from server.engine.structured.token_mask import allocate_bitmask, apply_token_bitmask_, bitmask_of

logger = logging.getLogger(__name__)


class GrammarRowFailed(RuntimeError):
    """A row's grammar cannot go on (a rejected token, or a per-step resource limit); that row fails alone."""

    code = "grammar_failed"

    def __init__(self, reason: str):
        super().__init__(f"Structured output failed: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class GrammarVocab:
    """The token ids a grammar's masks range over.

    ``vocab_size`` is the model's logits width; ids from ``tokenizer_size`` up are never allowed.
    ``valid_words`` / ``eos_words`` are ``(words,)`` int32 masks of the real ids and of the EOS ids.
    """

    vocab_size: int
    tokenizer_size: int
    eos_ids: tuple[int, ...]
    valid_words: torch.Tensor
    eos_words: torch.Tensor

    @classmethod
    def build(cls, vocab_size: int, tokenizer_size: int, eos_ids: Sequence[int]) -> GrammarVocab:
        return cls(
            vocab_size=vocab_size,
            tokenizer_size=tokenizer_size,
            eos_ids=tuple(eos_ids),
            valid_words=bitmask_of(range(tokenizer_size), vocab_size),
            eos_words=bitmask_of(eos_ids, vocab_size),
        )


class RowGrammar:
    """A matcher for one row: fill its mask, accept the sampled token, tell when it is done.

    Used by the engine thread only (one per constrained row; not shared between threads). Once the
    grammar is complete only EOS is allowed, so the row finishes with ``stop``.
    """

    def __init__(self, matcher: Any, vocab: GrammarVocab):
        self._matcher = matcher  # an llguidance.LLMatcher of its own
        self.vocab = vocab
        self._terminated = False
        self._error: str | None = None

    def is_complete(self) -> bool:
        """Nothing but EOS may follow (the text so far is a whole document of the grammar)."""
        return self._matcher.is_stopped()

    def is_terminated(self) -> bool:
        """EOS has been accepted: the row is finished."""
        return self._terminated

    @property
    def error(self) -> str | None:
        """Why the row failed, once it has (a rejected token, a resource limit)."""
        return self._error

    def fill_mask(self, bitmask: torch.Tensor, index: int = 0) -> None:
        """Write this row's allowed ids into row ``index`` of a CPU ``(B, words)`` int32 bitmask.

        Raises:
            GrammarRowFailed: the matcher is in an error state.
        """
        check_bitmask(bitmask, self.vocab)
        if fill_masks([self], bitmask[index : index + 1]):
            raise GrammarRowFailed(self._error or "the grammar failed")

    def apply(self, logits_row: torch.Tensor) -> None:
        """Set this row's disallowed logits to ``-inf`` in place (a ``(V,)`` float row, any device)."""
        bitmask = allocate_bitmask(1, self.vocab.vocab_size)
        self.fill_mask(bitmask)
        apply_token_bitmask_(logits_row, bitmask[0])

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False if the grammar does not allow it (the row has failed)."""
        if self._terminated or self._error is not None:
            return False
        if token_id in self.vocab.eos_ids and (self.is_complete() or self._matcher.is_accepting()):
            self._terminated = True
            return True
        if not 0 <= token_id < self.vocab.tokenizer_size or not self._matcher.consume_token(token_id):
            self._error = self._matcher.get_error() or f"token {token_id} is not allowed here"
            logger.debug("grammar rejected token %s: %s", token_id, self._error)
            return False
        return True

    def _check_failed(self) -> bool:
        """True once the row cannot go on (its matcher is in error, or a token was rejected)."""
        if self._error is None and self._matcher.is_error():
            self._error = self._matcher.get_error()
        return self._error is not None

    def _needs_matcher_mask(self) -> bool:
        """False when only EOS may follow, so the mask is known without asking the matcher."""
        return not (self._terminated or self.is_complete())


def check_bitmask(bitmask: torch.Tensor, vocab: GrammarVocab) -> None:
    """Refuse a bitmask llguidance cannot write into: it must be a contiguous CPU ``(B, words)`` int32."""
    if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not bitmask.is_contiguous():
        raise ValueError(
            f"the bitmask must be a contiguous CPU int32 tensor, not {bitmask.dtype} on {bitmask.device}"
        )
    if bitmask.dim() != 2 or bitmask.shape[1] * 32 < vocab.vocab_size:
        raise ValueError(f"a bitmask of shape {tuple(bitmask.shape)} cannot hold {vocab.vocab_size} ids")


def fill_masks(rows: Sequence[RowGrammar], bitmask: torch.Tensor, executor: Any = None) -> list[int]:
    """Fill ``bitmask[i]`` for each ``rows[i]`` (a CPU ``(≥ len(rows), words)`` int32 tensor).

    Rows whose grammar is complete (or ended) get the EOS-only mask without asking their matcher; the
    others are computed in one llguidance call, across ``executor``'s threads when one is given
    (an ``llguidance.LLExecutor``), else one after another.

    Returns:
        The indices of the rows that failed (their ``error`` says why); their mask allows only EOS so
        the step stays finite, and the engine should finish them with an error.
    """
    if not rows:
        return []
    vocab = rows[0].vocab
    check_bitmask(bitmask, vocab)
    if len(rows) > bitmask.shape[0]:
        raise ValueError(f"a bitmask of {bitmask.shape[0]} rows cannot hold {len(rows)} masks")
    row_bytes = bitmask.shape[1] * bitmask.element_size()
    failed = [i for i, row in enumerate(rows) if row._check_failed()]
    computed = [i for i, row in enumerate(rows) if i not in failed and row._needs_matcher_mask()]
    if computed:
        pairs = [(rows[i]._matcher, i) for i in computed]
        if executor is not None and len(pairs) > 1:
            executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), row_bytes, bitmask.shape[0])
        else:
            for matcher, i in pairs:
                matcher.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), row_bytes)
        newly_failed = [i for i in computed if rows[i]._check_failed()]
        failed = sorted(failed + newly_failed)
        index = torch.tensor(computed)
        bitmask[index] = bitmask[index] & vocab.valid_words  # ids past the tokenizer never
    for i, row in enumerate(rows):
        if i in failed or not row._needs_matcher_mask():
            bitmask[i].copy_(vocab.eos_words)
    for i in failed:
        logger.debug("grammar row %d failed: %s", i, rows[i].error)
    return failed
