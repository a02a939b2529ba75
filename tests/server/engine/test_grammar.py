"""Structured outputs on the engine side: random schemas, regexes and choices driven token by token."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from server.engine.structured import (
    GrammarCompiler,
    GrammarInvalid,
    GrammarSpec,
    allocate_bitmask,
    allowed_ids,
    apply_token_bitmask_,
    fill_masks,
)
from server.engine.structured.number_caps import cap_numbers
from tests.grammar_walk import TokenClasses, load_test_tokenizer, make_compiler, random_walk, token_classes

PROPERTY = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    phases=[
        Phase.explicit,
        Phase.reuse,
        Phase.generate,
    ],  # a failing walk is shown as found: shrinking one is slow
    suppress_health_check=[HealthCheck.too_slow],
)
NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)


@pytest.fixture(scope="module")
def tokenizer():
    return load_test_tokenizer()


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return make_compiler(tokenizer)


@pytest.fixture(scope="module")
def classes(tokenizer) -> TokenClasses:
    return token_classes(tokenizer)


# --- random schemas ---------------------------------------------------------------------------------------


def leaf_schemas() -> st.SearchStrategy[dict]:
    bounded_int = st.tuples(st.integers(-50, 50), st.integers(0, 100)).map(
        lambda lo_span: {"type": "integer", "minimum": lo_span[0], "maximum": lo_span[0] + lo_span[1]}
    )
    return st.one_of(
        st.just({"type": "string"}),
        st.integers(1, 12).map(lambda n: {"type": "string", "maxLength": n}),
        st.just({"type": "integer"}),
        bounded_int,
        st.just({"type": "boolean"}),
        st.lists(
            st.text(alphabet="abcxyz -", min_size=1, max_size=6), min_size=1, max_size=4, unique=True
        ).map(lambda values: {"enum": values}),
    )


def object_schemas(children: st.SearchStrategy[dict], max_properties: int = 4) -> st.SearchStrategy[dict]:
    """Objects of ``children`` with a random required list, sometimes closed to other properties."""

    @st.composite
    def build(draw) -> dict:
        properties = draw(st.dictionaries(NAMES, children, min_size=1, max_size=max_properties))
        required = [name for name in properties if draw(st.booleans())]
        schema = {"type": "object", "properties": properties, "required": required}
        if draw(st.booleans()):
            schema["additionalProperties"] = False
        return schema

    return build()


def schemas(depth: int = 3) -> st.SearchStrategy[dict]:
    """Objects of strings / ints / bools / enums / arrays, with required lists, nested up to ``depth``."""
    if depth == 1:
        return object_schemas(leaf_schemas())
    inner = schemas(depth - 1)
    arrays = st.one_of(leaf_schemas(), inner).map(lambda items: {"type": "array", "items": items})
    return object_schemas(st.one_of(leaf_schemas(), leaf_schemas(), arrays, inner))


@PROPERTY
@given(schema=schemas(), seed=st.integers(0, 2**32 - 1))
def test_random_walks_of_a_schema_give_valid_json(compiler, tokenizer, classes, schema, seed):
    walk = random_walk(compiler.compile(GrammarSpec.json_schema(schema)).new_row(), tokenizer, classes, seed)
    assert walk.terminated, f"no end within the step bound: {walk.text!r}"
    jsonschema.validate(json.loads(walk.text), schema)


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1))
def test_random_walks_of_json_object_give_an_object(compiler, tokenizer, classes, seed):
    walk = random_walk(compiler.compile(GrammarSpec.json_object()).new_row(), tokenizer, classes, seed)
    assert walk.terminated
    assert isinstance(json.loads(walk.text), dict)


REGEXES = [
    r"[0-9]{3}-[0-9]{3}-[0-9]{4}",
    r"[a-z]+@[a-z]+\.(com|org|net)",
    r"(yes|no|maybe)",
    r"[A-Z][a-z]{0,5}( [A-Z][a-z]{0,5}){0,2}",
    r"-?(0|[1-9][0-9]{0,4})(\.[0-9]{1,3})?",
]


@PROPERTY
@given(pattern=st.sampled_from(REGEXES), seed=st.integers(0, 2**32 - 1))
def test_random_walks_of_a_regex_fully_match_it(compiler, tokenizer, classes, pattern, seed):
    walk = random_walk(compiler.compile(GrammarSpec.regex(pattern)).new_row(), tokenizer, classes, seed)
    assert walk.terminated
    assert re.fullmatch(pattern, walk.text), walk.text


# Control and unassigned characters (Cc, Cn) are left out: SmolLM2's tokenizer cannot write some of them
# (it encodes "\x06" to no token at all), and with one in a literal llguidance's mask lets through a
# token that its parser then refuses; the row fails (GrammarRowFailed) rather than writing garbage.
CHOICE_CHARS = st.characters(exclude_categories=("Cs", "Cn", "Cc"))


@PROPERTY
@given(
    choices=st.lists(st.text(CHOICE_CHARS, min_size=1, max_size=10), min_size=1, max_size=5, unique=True),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_walks_of_a_choice_give_one_of_the_choices(compiler, tokenizer, classes, choices, seed):
    walk = random_walk(compiler.compile(GrammarSpec.choice(choices)).new_row(), tokenizer, classes, seed)
    assert walk.terminated
    assert walk.text in choices


# --- masks and EOS ----------------------------------------------------------------------------------------


def test_properties_are_written_in_the_schema_order(compiler, tokenizer, classes):
    schema = {
        "type": "object",
        "properties": {name: {"type": "boolean"} for name in ("zeta", "alpha", "mid")},
        "required": ["zeta", "alpha", "mid"],
        "additionalProperties": False,
    }
    walk = random_walk(compiler.compile(GrammarSpec.json_schema(schema)).new_row(), tokenizer, classes, 0)
    assert list(json.loads(walk.text)) == ["zeta", "alpha", "mid"]


def test_a_complete_grammar_allows_only_eos_and_ids_past_the_tokenizer_never(compiler, tokenizer):
    row = compiler.compile(GrammarSpec.choice(["ok"])).new_row()
    for token in tokenizer.encode("ok", add_special_tokens=False):
        assert row.accept(token)
    bitmask = allocate_bitmask(1, compiler.vocab.vocab_size)
    row.fill_mask(bitmask)
    assert allowed_ids(bitmask[0], compiler.vocab.vocab_size) == [tokenizer.eos_token_id]
    assert row.accept(tokenizer.eos_token_id) and row.is_terminated()
    row.fill_mask(bitmask)
    assert allowed_ids(bitmask[0], compiler.vocab.vocab_size) == [tokenizer.eos_token_id]


def test_an_id_past_the_tokenizer_is_refused(compiler, tokenizer):
    row = compiler.compile(GrammarSpec.json_object()).new_row()
    assert not row.accept(len(tokenizer) + 1)  # an id of the padded logits only
    assert row.error and not row.accept(tokenizer.encode("{", add_special_tokens=False)[0])


def test_every_eos_id_ends_a_complete_grammar(tokenizer):
    eos_ids = sorted({tokenizer.eos_token_id, tokenizer.pad_token_id or 0})
    compiler = make_compiler(tokenizer, eos_token_ids=eos_ids)
    row = compiler.compile(GrammarSpec.regex("a")).new_row()
    assert row.accept(tokenizer.encode("a", add_special_tokens=False)[0])
    bitmask = allocate_bitmask(1, compiler.vocab.vocab_size)
    row.fill_mask(bitmask)
    assert allowed_ids(bitmask[0], compiler.vocab.vocab_size) == eos_ids


def test_a_rejected_token_fails_the_row_and_a_batch_fill_reports_it(compiler, tokenizer):
    rows = [compiler.compile(GrammarSpec.choice([w])).new_row() for w in ("yes", "no")]
    assert not rows[1].accept(tokenizer.encode("y", add_special_tokens=False)[0])
    assert rows[1].error
    bitmask = allocate_bitmask(2, compiler.vocab.vocab_size)
    assert fill_masks(rows, bitmask) == [1]
    assert allowed_ids(bitmask[1], compiler.vocab.vocab_size) == [tokenizer.eos_token_id]


def test_apply_sets_exactly_the_disallowed_logits_to_minus_inf(compiler, tokenizer):
    row = compiler.compile(GrammarSpec.choice(["yes", "no"])).new_row()
    bitmask = allocate_bitmask(1, compiler.vocab.vocab_size)
    row.fill_mask(bitmask)
    expected = allowed_ids(bitmask[0], compiler.vocab.vocab_size)
    logits = torch.randn(compiler.vocab.vocab_size)
    before = logits.clone()
    row.apply(logits)
    finite = torch.isfinite(logits).nonzero().flatten().tolist()
    assert finite == expected and expected
    assert torch.equal(logits[finite], before[finite])


def test_batched_apply_masks_the_named_rows_only(compiler):
    rows = [
        compiler.compile(GrammarSpec.choice(["yes"])).new_row(),
        compiler.compile(GrammarSpec.json_object()).new_row(),
    ]
    bitmask = allocate_bitmask(2, compiler.vocab.vocab_size)
    assert fill_masks(rows, bitmask) == []
    logits = torch.zeros(3, compiler.vocab.vocab_size)  # (B, V); rows 0 and 2 are constrained
    apply_token_bitmask_(logits, bitmask, rows=[0, 2])
    for logits_row, mask_row in ((0, 0), (2, 1)):
        finite = torch.isfinite(logits[logits_row]).nonzero().flatten().tolist()
        assert finite == allowed_ids(bitmask[mask_row], compiler.vocab.vocab_size)
    assert torch.isfinite(logits[1]).all()


# --- errors, limits, cache ---------------------------------------------------------------------------------

INVALID = [
    (GrammarSpec.json_schema({"not": {"type": "string"}}), "response_format.json_schema.schema", "not"),
    (
        GrammarSpec.json_schema({"type": "array", "uniqueItems": True}),
        "response_format.json_schema.schema",
        "uniqueItems",
    ),
    (GrammarSpec.json_schema({"type": "strin"}), "response_format.json_schema.schema", "strin"),
    (GrammarSpec.json_schema({"$ref": "#/$defs/missing"}), "response_format.json_schema.schema", "missing"),
    (GrammarSpec.regex("[a-"), "structured_outputs.regex", "unclosed character class"),
    (GrammarSpec.regex("(?=a)b"), "structured_outputs.regex", "look-around"),
    (GrammarSpec.lark('start: "a" | undefined_rule'), "structured_outputs.grammar", "undefined_rule"),
    (GrammarSpec.ebnf('root ::= "a" | undefined_rule'), "structured_outputs.grammar", "undefined_rule"),
    (GrammarSpec.choice([]), "structured_outputs.choice", "at least one"),
]


@pytest.mark.parametrize(("spec", "param", "named"), INVALID)
def test_invalid_specs_raise_grammar_invalid_naming_the_problem(compiler, spec, param, named):
    with pytest.raises(GrammarInvalid) as raised:
        compiler.compile(spec)
    assert isinstance(raised.value, ValueError)
    assert raised.value.param == param and named in raised.value.reason


def test_the_caller_names_the_param(compiler):
    with pytest.raises(GrammarInvalid) as raised:
        compiler.compile(GrammarSpec.json_schema({"not": {}}, param="structured_outputs.json"))
    assert raised.value.param == "structured_outputs.json"


def test_an_oversized_schema_names_the_size_limit(tokenizer):
    compiler = make_compiler(tokenizer, max_schema_bytes=200)
    schema = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(20)}}
    with pytest.raises(GrammarInvalid, match="max_schema_bytes"):
        compiler.compile(GrammarSpec.json_schema(schema))


def test_a_compile_over_the_time_limit_names_the_time_limit(tokenizer, monkeypatch):
    compiler = make_compiler(tokenizer, compile_timeout_s=0.05)
    released = threading.Event()
    real_build = compiler._build

    def slow_build(spec):  # a compile that outlasts the limit, released once the caller has given up
        released.wait(timeout=30)
        return real_build(spec)

    monkeypatch.setattr(compiler, "_build", slow_build)
    spec = GrammarSpec.json_schema({"type": "object", "properties": {"a": {"type": "string"}}})
    with pytest.raises(GrammarInvalid, match=r"0\.05 s \(compile_timeout_s\)"):
        compiler.compile(spec)
    released.set()
    assert compiler.cached_count() == 0  # an abandoned compile is not cached


def test_equal_specs_share_one_compiled_grammar_and_the_cache_is_lru(tokenizer):
    compiler = make_compiler(tokenizer, cache_size=2)
    first = compiler.compile(
        GrammarSpec.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    )
    again = compiler.compile(
        GrammarSpec.json_schema({"properties": {"a": {"type": "integer"}}, "type": "object"})
    )
    reordered = compiler.compile(
        GrammarSpec.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    )
    assert again is not first  # key order is part of the spec (it orders the output)
    assert reordered is first
    compiler.compile(GrammarSpec.regex("x"))  # evicts the least recently used: `again`
    assert compiler.cached_count() == 2
    assert (
        compiler.compile(
            GrammarSpec.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
        )
        is first
    )


def test_concurrent_compiles_of_one_spec_give_one_grammar(tokenizer):
    compiler = make_compiler(tokenizer)
    spec = GrammarSpec.json_schema({"type": "object", "properties": {"n": {"type": "integer"}}})
    results = []
    threads = [threading.Thread(target=lambda: results.append(compiler.compile(spec))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(r) for r in results}) == 1 and len(results) == 6


def test_rows_of_one_grammar_are_independent(compiler, tokenizer):
    compiled = compiler.compile(GrammarSpec.choice(["ab", "cd"]))
    first, second = compiled.new_row(), compiled.new_row()
    assert first.accept(tokenizer.encode("a", add_special_tokens=False)[0])
    assert second.accept(tokenizer.encode("c", add_special_tokens=False)[0])


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        (GrammarSpec.ebnf('root ::= "id-" [0-9]+ ("a" | "b")'), r"id-[0-9]+(a|b)"),
        (GrammarSpec.lark('start: "n=" NUM ";"\nNUM: /[1-9][0-9]{0,3}/'), r"n=[1-9][0-9]{0,3};"),
    ],
)
def test_gbnf_and_lark_grammars_constrain_the_output(compiler, tokenizer, classes, spec, pattern):
    for seed in range(5):
        walk = random_walk(compiler.compile(spec).new_row(), tokenizer, classes, seed)
        assert walk.terminated and re.fullmatch(pattern, walk.text), walk.text


def test_a_schema_that_is_not_an_object_is_refused():
    with pytest.raises(GrammarInvalid, match="must be an object"):
        GrammarSpec.json_schema("not a schema")  # type: ignore[arg-type]


def test_a_bitmask_of_the_wrong_kind_is_refused(compiler):
    row = compiler.compile(GrammarSpec.json_object()).new_row()
    with pytest.raises(ValueError, match="int32"):
        row.fill_mask(torch.zeros(1, 8000, dtype=torch.int64))
    with pytest.raises(ValueError, match="cannot hold"):
        row.fill_mask(torch.zeros(1, 1, dtype=torch.int32))


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"vocab_size": 10}, "vocab_size"),
        ({"eos_token_ids": [10**6]}, "eos_token_ids"),
        ({"compile_timeout_s": 0}, "compile_timeout_s"),
        ({"cache_size": 0}, "cache_size"),
        ({"max_schema_bytes": -1}, "max_schema_bytes"),
    ],
)
def test_compiler_settings_are_checked(tokenizer, kwargs, named):
    kwargs = {"vocab_size": len(tokenizer), **kwargs}
    with pytest.raises(ValueError, match=named):
        GrammarCompiler(tokenizer, **kwargs)


# --- number caps (a model must not write digits until max_tokens) ------------------------------------------

CAPPED = {"minimum": -(10**15 - 1), "maximum": 10**15 - 1}


@pytest.mark.parametrize(
    ("schema", "capped"),
    [
        ({"type": "integer"}, {"type": "integer", **CAPPED}),
        ({"type": "number"}, {"type": "number", **CAPPED, "multipleOf": 1e-6}),
        ({"type": "integer", "minimum": 3}, {"type": "integer", "minimum": 3, "maximum": 10**15 - 1}),
        (
            {"type": "number", "exclusiveMaximum": 1, "multipleOf": 0.5},
            {"type": "number", "exclusiveMaximum": 1, "multipleOf": 0.5, "minimum": -(10**15 - 1)},
        ),
        (
            {"type": "array", "items": {"type": "integer"}, "default": [{"type": "integer"}]},
            {"type": "array", "items": {"type": "integer", **CAPPED}, "default": [{"type": "integer"}]},
        ),
        ({"type": "string"}, {"type": "string"}),
        (True, True),
    ],
)
def test_cap_numbers_adds_only_the_missing_bounds(schema, capped):
    assert cap_numbers(schema) == capped


@pytest.mark.parametrize(("kind", "text"), [("integer", "1" * 15), ("number", "2.123456")])
def test_an_unbounded_number_stops_taking_digits_at_its_cap(compiler, tokenizer, kind, text):
    row = compiler.compile(GrammarSpec.json_schema({"type": kind})).new_row()
    for token in tokenizer.encode(text, add_special_tokens=False):
        assert row.accept(token), row.error
    bitmask = allocate_bitmask(1, compiler.vocab.vocab_size)
    row.fill_mask(bitmask)
    allowed = allowed_ids(bitmask[0], compiler.vocab.vocab_size)
    texts = tokenizer.batch_decode([[i] for i in allowed])
    assert allowed == [tokenizer.eos_token_id], texts[:10]  # no more digits, no exponent: only the end
