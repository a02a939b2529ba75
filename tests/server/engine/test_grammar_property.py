"""Structured outputs through the engine: random schemas sampled on the tiny model validate, and a
constrained row's tokens do not depend on the rows batched beside it."""

from __future__ import annotations

import json
import queue
import time
from dataclasses import replace

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from adapters.lease import AdapterChoice
from server.engine.structured import GrammarCompiler, GrammarSpec
from server.engine.types import GenerationRequest, SamplingParams
from tests.conftest import copy_adapter_store
from tests.server.engine.test_engine import make_engine
from tests.server.engine.test_grammar import object_schemas

PROMPT = "Reply in JSON:"
SEEDS_PER_SCHEMA = 4


@pytest.fixture(scope="module")
def engine_and_compiler(tiny_base_dir, tiny_adapter_sources, tmp_path_factory):
    store = copy_adapter_store(tmp_path_factory.mktemp("grammar-property") / "adapters", tiny_adapter_sources)
    eng, tokenizer = make_engine(tiny_base_dir, store, torch.float64)
    compiler = GrammarCompiler(tokenizer, vocab_size=eng.runner.model.config.vocab_size)
    yield eng, tokenizer, compiler
    eng.stop()


def leaf_schemas() -> st.SearchStrategy[dict]:
    """string / integer / number / boolean / enum; strings bounded so a random model's strings end."""
    bounded = st.tuples(st.integers(-20, 20), st.integers(0, 50)).map(
        lambda lo_span: {"minimum": lo_span[0], "maximum": lo_span[0] + lo_span[1]}
    )
    return st.one_of(
        st.integers(0, 6).map(lambda n: {"type": "string", "maxLength": n}),
        st.just({"type": "integer"}),
        bounded.map(lambda b: {"type": "integer", **b}),
        st.just({"type": "number"}),
        bounded.map(lambda b: {"type": "number", **b}),
        st.just({"type": "boolean"}),
        st.lists(st.sampled_from(["a", "b c", "x-y", "zz"]), min_size=1, max_size=3, unique=True).map(
            lambda values: {"enum": values}
        ),
    )


def arrays_of(items: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    return items.map(lambda item: {"type": "array", "items": item, "maxItems": 3})


def objects_of(children: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    return object_schemas(children, max_properties=3)


def schemas() -> st.SearchStrategy[dict]:
    """Objects of leaves and arrays of leaves, whose properties may be such objects (nesting ≤ 2)."""
    inner = objects_of(st.one_of(leaf_schemas(), arrays_of(leaf_schemas())))
    return objects_of(st.one_of(leaf_schemas(), arrays_of(leaf_schemas()), inner, arrays_of(inner)))


def run_requests(eng, tokenizer, params_list: list[SamplingParams], timeout_s: float = 60.0):
    """Submits every request at once (one batch); returns (text, finish reason, token ids) of each."""
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    outputs: list[queue.Queue] = []
    requests = []
    for i, params in enumerate(params_list):
        outputs.append(queue.Queue())
        lease = eng.registry.lease(AdapterChoice(None))  # released by the engine
        requests.append(GenerationRequest(f"r{time.monotonic_ns()}-{i}", prompt_ids, params, lease))
    for request, out in zip(requests, outputs):
        eng.submit(request, out.put)
    return [collect(out, timeout_s) for out in outputs]


def collect(outputs: queue.Queue, timeout_s: float) -> tuple[str, str, list[int]]:
    text, ids = "", []
    deadline = time.monotonic() + timeout_s
    while True:
        out = outputs.get(timeout=max(0.1, deadline - time.monotonic()))
        assert out.error is None, out.error
        text += out.text_delta
        ids += list(out.token_ids)
        if out.finished:
            return text, out.finish_reason, ids


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # shrinking re-runs the engine: slow
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(schema=schemas())
def test_sampled_outputs_of_random_schemas_validate(engine_and_compiler, schema):
    eng, tokenizer, compiler = engine_and_compiler
    grammar = compiler.compile(GrammarSpec.json_schema(schema))
    params = [
        SamplingParams(max_tokens=160, temperature=1.0, seed=seed, grammar=grammar)
        for seed in range(SEEDS_PER_SCHEMA)
    ]
    results = run_requests(eng, tokenizer, params)
    note(f"outputs: {results}")
    finished = [text for text, reason, _ in results if reason == "stop"]
    for text in finished:
        jsonschema.validate(json.loads(text), schema)
    assert finished, "no output ended within max_tokens: numbers and strings here are bounded"
    assert len({text for text, _, _ in results}) > 1, "the seeds should give different outputs"


def test_a_greedy_constrained_row_gives_the_same_tokens_alone_and_batched(engine_and_compiler):
    eng, tokenizer, compiler = engine_and_compiler
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer", "maximum": 99}},
        "required": ["name", "n"],
        "additionalProperties": False,
    }
    greedy = SamplingParams(max_tokens=60, temperature=0.0)
    constrained = replace(greedy, grammar=compiler.compile(GrammarSpec.json_schema(schema)))
    other = replace(greedy, grammar=compiler.compile(GrammarSpec.regex("[a-z]{3,9}")))
    free = replace(greedy, max_tokens=30, ignore_eos=True)
    sampled_other = SamplingParams(max_tokens=60, temperature=1.0, seed=3, grammar=constrained.grammar)
    (alone,) = run_requests(eng, tokenizer, [constrained])
    batched = run_requests(eng, tokenizer, [free, other, constrained, free, sampled_other, free])
    assert alone[1] == "stop" and alone[2], alone
    jsonschema.validate(json.loads(alone[0]), schema)
    assert batched[2] == alone
    (other_alone,) = run_requests(eng, tokenizer, [other])
    assert batched[1] == other_alone
    (free_alone,) = run_requests(eng, tokenizer, [free])
    assert batched[0] == free_alone
