"""Driving a grammar with random allowed tokens, as a sampler would, for property tests."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adapters.base_model import default_cache_dir
from server.engine.structured import GrammarCompiler, RowGrammar, allocate_bitmask
from server.engine.structured.token_mask import unpack_bits

CLOSING_CHARS = set('"}],')
REAL_TOKENIZER_MAX_LOAD_S = 2.0


@dataclass
class Walk:
    text: str
    token_ids: list[int]
    terminated: bool


@dataclass(frozen=True)
class TokenClasses:
    """Per id: does its text only close things (``"``, ``}``, ``]``, ``,``); is it one character."""

    closing: torch.Tensor  # (tokenizer size,) bool
    single_char: torch.Tensor  # (tokenizer size,) bool


def token_classes(tokenizer) -> TokenClasses:
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return TokenClasses(
        closing=torch.tensor([bool(t) and set(t) <= CLOSING_CHARS for t in texts]),
        single_char=torch.tensor([len(t) == 1 for t in texts]),
    )


def random_walk(row: RowGrammar, tokenizer, classes: TokenClasses, seed: int, max_steps: int = 800) -> Walk:
    """Sample a random allowed token each step until EOS is accepted or ``max_steps`` pass.

    The pick leans more and more towards closing tokens and EOS (from 30 % to always, over the walk) so
    documents end; otherwise half the time among the allowed one-character tokens (so a lone ``@`` among
    ten thousand words still comes up), else among all allowed. Every pick is an allowed id. Each step
    checks that the mask allows no id beyond the tokenizer and, once complete, nothing but EOS.
    """
    rnd, vocab = random.Random(seed), row.vocab
    single_char = np.zeros(vocab.vocab_size, dtype=bool)
    single_char[: len(classes.single_char)] = classes.single_char.numpy()
    ending_ids = np.zeros(vocab.vocab_size, dtype=bool)
    ending_ids[: len(classes.closing)] = classes.closing.numpy()
    ending_ids[list(vocab.eos_ids)] = True
    bitmask = allocate_bitmask(1, vocab.vocab_size)
    ids: list[int] = []
    for step in range(max_steps):
        row.fill_mask(bitmask)
        allowed = unpack_bits(bitmask[0], vocab.vocab_size).numpy()  # (V,) bools
        allowed_ids = np.flatnonzero(allowed)
        assert len(allowed_ids) and int(allowed_ids[-1]) < vocab.tokenizer_size
        if row.is_complete():
            assert set(allowed_ids.tolist()) == set(vocab.eos_ids)
        ending = np.flatnonzero(allowed & ending_ids)
        short = np.flatnonzero(allowed & single_char)
        pressure = 0.3 + step / (max_steps / 2)
        if len(ending) and rnd.random() < pressure:
            pool = ending
        elif len(short) and rnd.random() < 0.5:
            pool = short
        else:
            pool = allowed_ids
        token = int(pool[rnd.randrange(len(pool))])
        assert row.accept(token), row.error
        if row.is_terminated():
            return Walk(tokenizer.decode(ids), ids, True)
        ids.append(token)
    return Walk(tokenizer.decode(ids), ids, False)


def real_tokenizer_dir() -> Path | None:
    """The converted default model's folder, if this machine has one (never converts it)."""
    found = sorted((default_cache_dir() / "models").glob("SmolLM2-135M-Instruct*/tokenizer.json"))
    return found[0].parent if found else None


def load_test_tokenizer():
    """SmolLM2's real tokenizer when it is on disk and loads in under 2 s, else the tiny byte tokenizer."""
    from transformers import AutoTokenizer

    from tests.tiny_models import make_tokenizer

    folder = real_tokenizer_dir()
    if folder is not None:
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if time.perf_counter() - start < REAL_TOKENIZER_MAX_LOAD_S:
            return tokenizer
    return make_tokenizer()


def make_compiler(tokenizer, extra_ids: int = 7, **kwargs) -> GrammarCompiler:
    """A compiler whose logits are wider than the tokenizer (as with padded embedding matrices)."""
    return GrammarCompiler(tokenizer, vocab_size=len(tokenizer) + extra_ids, **kwargs)
