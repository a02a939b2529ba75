"""A GrammarSpec written as llguidance grammar text (Lark with ``%json``, or llguidance's JSON form).

JSON is generated in one fixed layout, ``{"key": value, "k2": [1, 2]}`` (Python's ``json.dumps``
separators, no other whitespace): a small model can then not wander into endless newlines, and the
text still reads like ordinary JSON.
"""

from __future__ import annotations

import json
from typing import Any

from server.engine.structured.number_caps import cap_numbers
from server.engine.structured.spec import GrammarInvalid, GrammarSpec, ToolCallFormat

JSON_LAYOUT: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_TEXT = r"(.|\n)*"


def to_llguidance(spec: GrammarSpec) -> str:
    """The llguidance grammar for ``spec``; syntax is checked later, when the matcher is built.

    Raises:
        GrammarInvalid: the spec is malformed before llguidance sees it (no choices, bad GBNF).
    """
    import llguidance

    if spec.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_LAYOUT)
    if spec.kind == "json_schema":
        return json_schema_grammar(spec)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(str(spec.payload))
    if spec.kind == "choice":
        return choice_lark(spec)
    if spec.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(str(spec.payload))
    if spec.kind == "ebnf":
        return gbnf_grammar(spec)
    assert isinstance(spec.payload, ToolCallFormat)
    return llguidance.LLMatcher.grammar_from_lark(tool_calls_lark(spec.payload, spec.param))


def json_schema_grammar(spec: GrammarSpec) -> str:
    import llguidance

    schema = cap_numbers(json.loads(str(spec.payload)))  # digits bounded: see number_caps.py
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_LAYOUT)
    except ValueError as e:
        raise GrammarInvalid(spec.param, str(e)) from e


def choice_lark(spec: GrammarSpec) -> str:
    """``start: "a" | "b"``, each choice a JSON-escaped literal."""
    choices = spec.payload
    if not isinstance(choices, tuple) or not choices:
        raise GrammarInvalid(spec.param, "choice needs at least one string")
    if not all(isinstance(c, str) for c in choices):
        raise GrammarInvalid(spec.param, "every choice must be a string")
    return "start: " + " | ".join(json.dumps(c) for c in choices)


def gbnf_grammar(spec: GrammarSpec) -> str:
    import llguidance

    try:
        return llguidance.grammar_from("gbnf", str(spec.payload))
    except ValueError as e:  # llguidance wraps the converter's error; its text names the rule
        reason = str(e).removeprefix("Failed to convert the grammar from GBNF to Lark: ")
        raise GrammarInvalid(spec.param, reason) from e


def check_parameters_schema(parameters_json: str, param: str) -> None:
    """Refuse a tool's parameters schema on its own, so the error names that tool (not the whole grammar)."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(parameters_json, defaults=JSON_LAYOUT)
    except ValueError as e:
        raise GrammarInvalid(param, str(e)) from e
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarInvalid(param, error)


def tool_call_schema(name: str, parameters_json: str, param: str) -> dict[str, Any]:
    """``{"name": <name>, "arguments": <parameters>}``, name first, as one JSON schema."""
    try:
        parameters = json.loads(parameters_json)
    except json.JSONDecodeError as e:
        raise GrammarInvalid(param, f"the parameters of tool {name!r} are not JSON: {e}") from e
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": cap_numbers(parameters)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        "x-guidance": JSON_LAYOUT,
    }


def tool_calls_lark(fmt: ToolCallFormat, param: str) -> str:
    """Lark for tool calls: only calls (``required`` / a named tool), or text then calls (``auto``).

    ``param`` is the tools' request field; a bad tool's error names ``<param>[i].function.parameters``.

    In ``auto`` the text is a lazy lexeme that ends at the first ``begin``: free text is unconstrained
    until a call opens, and after a call only more calls (with ``parallel``, up to ``max_calls``) or the
    end may follow.
    """
    for i, (_, parameters_json) in enumerate(fmt.tools):
        check_parameters_schema(parameters_json, f"{param}[{i}].function.parameters")
    tools = fmt.tools
    if fmt.mode not in ("required", "auto"):
        tools = tuple(t for t in fmt.tools if t[0] == fmt.mode)
        if not tools:
            raise GrammarInvalid("tool_choice", f"names {fmt.mode!r}, which is not among the tools")
    if not tools:
        raise GrammarInvalid(param, "tool calling needs at least one tool")
    begin, end = json.dumps(fmt.begin), json.dumps(fmt.end)
    if fmt.max_calls < 1:
        raise GrammarInvalid(param, f"max_calls must be at least 1, got {fmt.max_calls}")
    more = f' ("\\n"? {begin} body){{0,{fmt.max_calls - 1}}}' if fmt.parallel and fmt.max_calls > 1 else ""
    if fmt.mode == "auto":
        start = f"start: TEXT | opening body{more}\nopening[lazy]: TEXT {begin}\nTEXT: /{ANY_TEXT}/"
    else:
        start = f"start: {begin} body{more}"
    calls = " | ".join(f"tool_{i}" for i in range(len(tools)))
    lines = [start, f'body: "\\n"? ({calls}) "\\n"? {end}']
    for i, (name, parameters_json) in enumerate(tools):
        lines.append(f"tool_{i}: %json {json.dumps(tool_call_schema(name, parameters_json, param))}")
    return "\n".join(lines) + "\n"
