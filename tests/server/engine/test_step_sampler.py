"""One step's rows sampled together equal each row sampled alone, with or without a grammar."""

from __future__ import annotations

import pytest
import torch

from server.engine.sampling import sample_row
from server.engine.step_sampler import RowToSample, StepSampler
from server.engine.structured import GrammarRowFailed, GrammarSpec
from server.engine.types import NonFiniteLogits, SamplingParams
from tests.grammar_walk import load_test_tokenizer, make_compiler

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "n": {"type": "integer"}, "ok": {"type": "boolean"}},
    "required": ["name", "n", "ok"],
}
SPECS = [GrammarSpec.json_schema(SCHEMA), GrammarSpec.regex("[a-z]{2,6}"), GrammarSpec.choice(["yes", "no"])]
PARAMS = [
    SamplingParams(max_tokens=64, temperature=0.0),
    SamplingParams(max_tokens=64, temperature=1.0, seed=1),
    SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9, top_k=50, seed=2, presence_penalty=0.5),
]


@pytest.fixture(scope="module")
def compiler():
    return make_compiler(load_test_tokenizer())


def make_rows(compiler, layout: list[int | None], seed: int) -> list[RowToSample]:
    """One row per entry: an index into SPECS (constrained) or None (free); logits from ``seed``."""
    logits = torch.randn(
        len(layout), compiler.vocab.vocab_size, generator=torch.Generator().manual_seed(seed)
    )
    rows = []
    for i, spec_index in enumerate(layout):
        params = PARAMS[i % len(PARAMS)]
        generator = torch.Generator().manual_seed(100 + i) if not params.greedy else None
        grammar = compiler.compile(SPECS[spec_index]).new_row() if spec_index is not None else None
        rows.append(RowToSample(logits[i], [5, 6], params, generator, None, grammar))
    return rows


def solo_outcome(row: RowToSample) -> int | type[Exception]:
    try:
        return sample_row(row.logits, row.output_ids, row.params, row.generator, row.adapter, row.grammar)
    except (GrammarRowFailed, NonFiniteLogits) as e:
        return type(e)


def step_outcomes(sampler: StepSampler, rows: list[RowToSample]) -> list[int | type[Exception]]:
    return [type(o) if isinstance(o, Exception) else o for o in sampler.sample(rows)]


@pytest.mark.parametrize("layout", [[None] * 4, [0, None, 1, None, 2, 0], [0, 1, 2, 0, 1, 2], [None, 2]])
def test_a_step_equals_each_row_sampled_alone_over_many_steps(compiler, layout):
    sampler = StepSampler(max_rows=8)
    batched, solo = make_rows(compiler, layout, 0), make_rows(compiler, layout, 0)
    for step in range(12):
        logits = torch.randn(
            len(layout), compiler.vocab.vocab_size, generator=torch.Generator().manual_seed(step)
        )
        for a, b, row_logits in zip(batched, solo, logits):
            a.logits, b.logits = row_logits, row_logits.clone()
        together = step_outcomes(sampler, batched)
        alone = [solo_outcome(row) for row in solo]
        assert together == alone, f"step {step}"
        for a, b, token in zip(batched, solo, together):  # both copies of a row advance by the same token
            if a.grammar is not None and isinstance(token, int) and not a.grammar.is_terminated():
                assert a.grammar.accept(token) == b.grammar.accept(token)


def test_a_failed_grammar_row_and_a_non_finite_row_fail_alone(compiler):
    rows = make_rows(compiler, [0, 2, None, 1], 3)
    rows[1].grammar.accept(10**6)  # an id past the vocabulary: that row's grammar has failed
    rows[2].logits = rows[2].logits.clone()
    rows[2].logits[7] = float("nan")
    outcomes = StepSampler(max_rows=4).sample(rows)
    assert isinstance(outcomes[1], GrammarRowFailed) and outcomes[1].reason
    assert isinstance(outcomes[2], NonFiniteLogits)
    assert isinstance(outcomes[0], int) and isinstance(outcomes[3], int)
    assert rows[0].grammar.accept(outcomes[0]) and rows[3].grammar.accept(outcomes[3])


def test_free_rows_do_not_touch_the_grammar_buffers(compiler):
    sampler = StepSampler(max_rows=4)
    sampler.sample(make_rows(compiler, [None, None], 0))
    assert sampler._bitmask is None and sampler._executor is None


def test_the_bitmask_is_allocated_once_and_reused(compiler):
    sampler = StepSampler(max_rows=4)
    sampler.sample(make_rows(compiler, [0, None], 0))
    bitmask, scores = sampler._bitmask, sampler._scores
    sampler.sample(make_rows(compiler, [1, 2, 0, None], 1))
    assert sampler._bitmask is bitmask and sampler._scores is scores
    assert bitmask.shape == (4, (compiler.vocab.vocab_size + 31) // 32)


def test_a_step_over_max_rows_is_refused(compiler):
    with pytest.raises(ValueError, match="max_rows"):
        StepSampler(max_rows=2).sample(make_rows(compiler, [None, None, None], 0))
