"""The Hermes tool-calling format: rendering, the tool-call grammar, parsing and streamed parsing."""

from __future__ import annotations

import dataclasses
import json

import jsonschema
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from server.api.chat.tool_call_stream import ToolCallStreamParser
from server.api.chat.tool_format import (
    TOOL_CALL_BEGIN,
    ToolCall,
    ToolFormatError,
    parse_tool_calls,
    render_tool_messages,
    template_supports_tools,
    tool_call_block,
    tool_call_grammar,
)
from server.engine.structured import (
    GrammarCompiler,
    GrammarInvalid,
    GrammarSpec,
    allocate_bitmask,
    allowed_ids,
)
from server.engine.structured.spec import MAX_PARALLEL_TOOL_CALLS
from tests.grammar_walk import TokenClasses, load_test_tokenizer, make_compiler, random_walk, token_classes
from tests.tiny_models import make_tokenizer

PROPERTY = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
    "required": ["x", "y"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "add", "description": "Adds two integers", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}


def call_ids(index: int) -> str:
    return f"call_{index}"


# --- rendering -------------------------------------------------------------------------------------------

HISTORY = [
    {"role": "user", "content": "Weather in Paris and 2+3?"},
    {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {"id": "c2", "type": "function", "function": {"name": "add", "arguments": '{"x": 2, "y": 3}'}},
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "c2", "content": "5"},
]


def test_history_with_calls_and_results_renders_as_plain_turns():
    rendered = render_tool_messages(HISTORY, TOOLS, "auto")
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user"]
    assert '"name": "get_weather"' in rendered[0]["content"] and '"parameters"' in rendered[0]["content"]
    content, calls = parse_tool_calls(rendered[2]["content"], call_ids)
    assert content == "Let me look."
    assert [(c.name, json.loads(c.arguments_json)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("add", {"x": 2, "y": 3}),
    ]
    results = rendered[3]["content"]
    assert results.count("<tool_response>") == 2  # consecutive results share one user turn
    assert '"tool_call_id": "c1", "name": "get_weather", "content": "18 C"' in results
    make_tokenizer().apply_chat_template(rendered, tokenize=False)  # a plain template renders it


def test_tools_join_an_existing_system_turn_and_none_leaves_them_out():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    rendered = render_tool_messages(messages, TOOLS, "required")
    assert (
        rendered[0]["content"].startswith("Be brief.") and "must call at least one" in rendered[0]["content"]
    )
    assert len(rendered) == 2
    assert render_tool_messages(messages, TOOLS, "none") == messages
    named = render_tool_messages(messages, TOOLS, {"type": "function", "function": {"name": "add"}})
    assert "must call the function add" in named[0]["content"]


@pytest.mark.parametrize(
    ("messages", "tool_choice", "param"),
    [
        ([{"role": "tool", "content": "x"}], "auto", "messages[0].tool_call_id"),
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "a", "function": {"name": "add", "arguments": "{x"}}],
                }
            ],
            "auto",
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            [{"role": "user", "content": "hi"}],
            {"type": "function", "function": {"name": "nope"}},
            "tool_choice",
        ),
        ([{"role": "user", "content": "hi"}], "sometimes", "tool_choice"),
    ],
)
def test_malformed_tool_requests_name_the_field(messages, tool_choice, param):
    with pytest.raises(ToolFormatError) as raised:
        render_tool_messages(messages, TOOLS, tool_choice)
    assert raised.value.param == param


def test_native_tool_templates_are_detected():
    plain = make_tokenizer()
    assert not template_supports_tools(plain)
    native = make_tokenizer()
    native.chat_template = (
        "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}{% endfor %}"
        "<|im_end|>\n{% endif %}" + plain.chat_template
    )
    assert template_supports_tools(native)


# --- parsing ---------------------------------------------------------------------------------------------

PARSE_CASES = [
    ("Just text.", "Just text.", []),
    (
        '<tool_call>\n{"name": "add", "arguments": {"x": 1, "y": 2}}\n</tool_call>',
        None,
        [("add", '{"x": 1, "y": 2}')],
    ),
    (
        'Sure. <tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": {"k": [1]}}</tool_call>',
        "Sure.",
        [("a", "{}"), ("b", '{"k": [1]}')],
    ),
    ('<tool_call>{"name": "a", "arguments": {"q": "x}"}}', None, [("a", '{"q": "x}"}')]),  # end tag cut off
    ("A <tool_call>not json</tool_call> B", "A <tool_call>not json</tool_call> B", []),
    ('<tool_call>{"name": "a", "arguments": {"q": ', '<tool_call>{"name": "a", "arguments": {"q":', []),
    ('<tool_call>{"name": "a", "arguments": {}}<tool_call>{"name": "b"}', None, [("a", "{}"), ("b", "{}")]),
    ('<tool_call>{"name": "a", "parameters": {"z": 1}}</tool_call>', None, [("a", '{"z": 1}')]),
    ('<tool_call>{"name": "a", "arguments": "{\\"z\\": 1}"}</tool_call>', None, [("a", '{"z": 1}')]),
]


@pytest.mark.parametrize(("text", "content", "calls"), PARSE_CASES)
def test_parse_splits_content_and_calls(text, content, calls):
    parsed_content, parsed_calls = parse_tool_calls(text, call_ids)
    assert parsed_content == content
    assert [(c.name, c.arguments_json) for c in parsed_calls] == calls
    assert [c.id for c in parsed_calls] == [call_ids(i) for i in range(len(calls))]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
ARGUMENTS = st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=3)
TOOL_NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10)
CONTENT = st.text(max_size=30).filter(lambda t: "<tool_call>" not in t)


@PROPERTY
@given(content=CONTENT, calls=st.lists(st.tuples(TOOL_NAMES, ARGUMENTS), max_size=3))
def test_render_then_parse_gives_the_calls_back(content, calls):
    message = {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {
                "id": f"x{i}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments)},
            }
            for i, (name, arguments) in enumerate(calls)
        ],
    }
    [rendered] = render_tool_messages([message], None)
    parsed_content, parsed_calls = parse_tool_calls(rendered["content"], call_ids)
    assert parsed_content == (content.strip() or None)
    assert [(c.name, json.loads(c.arguments_json)) for c in parsed_calls] == calls


# --- streaming -------------------------------------------------------------------------------------------

CALLS = st.tuples(TOOL_NAMES, ARGUMENTS)
# Blocks left open (no end tag) are calls only where the text ends or the next block starts: an open
# block running into more text is broken after its name has streamed, the one case a stream cannot
# take back (see tool_call_stream's docstring).
OPEN_CALL = CALLS.map(lambda c: "<tool_call>" + json.dumps({"name": c[0], "arguments": c[1]}))
PIECES = st.one_of(
    CONTENT,
    CALLS.map(lambda call: tool_call_block(*call)),
    st.tuples(OPEN_CALL, CALLS).map(lambda pair: pair[0] + tool_call_block(*pair[1])),
    st.sampled_from(["<tool_call>oops</tool_call>", "<tool_", "</tool_call>", " \n ", "<tool_call>[1]"]),
)


def stream(text: str, cuts: list[int]) -> tuple[str | None, list[ToolCall]]:
    """Feed ``text`` split at ``cuts`` and join the deltas back up as a client would."""
    parser, content, calls = ToolCallStreamParser(call_ids), "", {}
    bounds = [0, *sorted(set(cuts)), len(text)]
    deltas = [parser.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])] + [parser.finish()]
    for delta in deltas:
        content += delta.content
        for part in delta.tool_calls:
            if part.id is not None:
                assert part.index not in calls and part.name  # id and name come first, once
                calls[part.index] = [part.id, part.name, ""]
            calls[part.index][2] += part.arguments
    assert sorted(calls) == list(range(len(calls)))
    return content or None, [ToolCall(*calls[i]) for i in sorted(calls)]


@PROPERTY
@given(data=st.data(), pieces=st.lists(PIECES, max_size=5), tail=st.one_of(st.just(""), OPEN_CALL))
def test_streamed_deltas_add_up_to_the_parse_wherever_the_text_is_split(data, pieces, tail):
    text = "".join(pieces) + tail
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    assert stream(text, cuts) == parse_tool_calls(text, call_ids)


def test_a_call_streams_its_name_before_its_arguments():
    parser = ToolCallStreamParser(call_ids)
    deltas = [
        parser.feed(piece)
        for piece in ['<tool_call>{"name": "add", ', '"arguments": {"x"', ": 1}}</tool_call>"]
    ]
    assert deltas[0].tool_calls[0].name == "add" and deltas[0].tool_calls[0].arguments == ""
    assert "".join(d.arguments for delta in deltas[1:] for d in delta.tool_calls) == '{"x": 1}'


# --- the tool-call grammar -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return load_test_tokenizer()


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return make_compiler(tokenizer)


@pytest.fixture(scope="module")
def classes(tokenizer) -> TokenClasses:
    return token_classes(tokenizer)


CHOICES = [("required", True), ("required", False), ({"type": "function", "function": {"name": "add"}}, True)]


@PROPERTY
@given(choice=st.sampled_from(CHOICES), seed=st.integers(0, 2**32 - 1))
def test_forced_tool_calls_always_parse_with_valid_arguments(compiler, tokenizer, classes, choice, seed):
    tool_choice, parallel = choice
    row = compiler.compile(tool_call_grammar(TOOLS, tool_choice, parallel)).new_row()
    walk = random_walk(row, tokenizer, classes, seed, max_steps=1500)
    assert walk.terminated
    content, calls = parse_tool_calls(walk.text, call_ids)
    assert content is None and calls and (parallel or len(calls) == 1)
    if isinstance(tool_choice, dict):  # a named tool is called exactly once, parallel or not
        assert len(calls) == 1
    for call in calls:
        assert call.name == "add" if isinstance(tool_choice, dict) else call.name in SCHEMAS
        jsonschema.validate(json.loads(call.arguments_json), SCHEMAS[call.name])


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1))
def test_auto_leaves_text_free_and_keeps_calls_valid(compiler, tokenizer, classes, seed):
    row = compiler.compile(tool_call_grammar(TOOLS, "auto", True)).new_row()
    walk = random_walk(row, tokenizer, classes, seed, max_steps=1500)
    assert walk.terminated
    _, calls = parse_tool_calls(walk.text, call_ids)
    for call in calls:
        jsonschema.validate(json.loads(call.arguments_json), SCHEMAS[call.name])


def test_auto_free_text_is_unconstrained_until_a_call_opens(compiler, tokenizer):
    row = compiler.compile(tool_call_grammar(TOOLS, "auto", False)).new_row()
    for token in tokenizer.encode("Any text {at all} <tool", add_special_tokens=False):
        assert row.accept(token)
    for token in tokenizer.encode('_call>{"name": "nope"', add_special_tokens=False):
        if not row.accept(token):
            break
    else:
        pytest.fail("a call of an unknown tool was accepted")


def test_a_named_tool_choice_allows_one_call_only(compiler, tokenizer):
    named = {"type": "function", "function": {"name": "add"}}
    assert tool_call_grammar(TOOLS, named, parallel_tool_calls=True).payload.parallel is False
    row = compiler.compile(tool_call_grammar(TOOLS, named, True)).new_row()
    call = tool_call_block("add", {"x": 1, "y": 2})
    for token in tokenizer.encode(call, add_special_tokens=False):
        assert row.accept(token)
    second = tokenizer.encode("\n" + TOOL_CALL_BEGIN, add_special_tokens=False)
    assert not all(row.accept(token) for token in second)


def test_none_needs_no_grammar_and_bad_choices_are_refused():
    assert tool_call_grammar(TOOLS, "none") is None
    with pytest.raises(GrammarInvalid):
        tool_call_grammar([], "required")
    with pytest.raises(ToolFormatError):
        tool_call_grammar(TOOLS, {"type": "function", "function": {}})


def test_an_unsupported_keyword_in_a_tool_schema_is_named(compiler):
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}
    with pytest.raises(GrammarInvalid) as raised:
        compiler.compile(tool_call_grammar([*TOOLS, bad], "required"))
    assert raised.value.param == "tools[2].function.parameters"
    assert raised.value.reason == 'Unimplemented keys: ["not"]'


def test_a_named_tool_that_is_not_among_the_tools_is_refused(compiler):
    fmt_spec = tool_call_grammar(TOOLS, "required")
    assert fmt_spec is not None
    spec = GrammarSpec("tool_calls", dataclasses.replace(fmt_spec.payload, mode="nope"), "tools")
    with pytest.raises(GrammarInvalid) as raised:
        compiler.compile(spec)
    assert raised.value.param == "tool_choice" and "nope" in raised.value.reason


@pytest.mark.parametrize(
    "tool", ["get_weather", {"type": "function"}, {"type": "retrieval", "function": {"name": "f"}}]
)
def test_a_malformed_tool_is_named(tool):
    with pytest.raises(ToolFormatError) as raised:
        render_tool_messages([{"role": "user", "content": "hi"}], [TOOLS[0], tool])
    assert raised.value.param == "tools[1]"


CALL_TEXT = '<tool_call>{"name": "add", "arguments": {"x": 1, "y": 2}}</tool_call>'


@pytest.mark.parametrize(
    ("max_calls", "calls_written", "may_go_on"), [(2, 1, True), (2, 2, False), (8, 7, True)]
)
def test_parallel_calls_end_after_max_calls(compiler, tokenizer, max_calls, calls_written, may_go_on):
    spec = tool_call_grammar(TOOLS, "required", parallel_tool_calls=True)
    spec = dataclasses.replace(spec, payload=dataclasses.replace(spec.payload, max_calls=max_calls))
    row = compiler.compile(spec).new_row()
    for token in tokenizer.encode(CALL_TEXT * calls_written, add_special_tokens=False):
        assert row.accept(token), row.error
    bitmask = allocate_bitmask(1, compiler.vocab.vocab_size)
    row.fill_mask(bitmask)
    allowed = allowed_ids(bitmask[0], compiler.vocab.vocab_size)
    assert tokenizer.eos_token_id in allowed
    assert (allowed != [tokenizer.eos_token_id]) == may_go_on  # another <tool_call> may open, or only EOS


def test_the_default_cap_is_max_parallel_tool_calls():
    spec = tool_call_grammar(TOOLS, "required", parallel_tool_calls=True)
    assert spec.payload.max_calls == MAX_PARALLEL_TOOL_CALLS == 8
