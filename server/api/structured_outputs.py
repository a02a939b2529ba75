"""Which grammar a request asks for: OpenAI's ``response_format``, vLLM's ``structured_outputs`` and
its older ``guided_*`` fields. One source per request; every refusal names the field."""

from __future__ import annotations

import json
from typing import Any

from server.engine.structured.spec import GrammarInvalid, GrammarSpec

GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
STRUCTURED_KEYS = {"json", "regex", "choice", "grammar"}


def grammar_spec(body: Any) -> GrammarSpec | None:
    """The request's constraint, or None for free text.

    Raises:
        GrammarInvalid: a malformed or conflicting constraint (``param`` names the field).
    """
    sources = [
        name for name in ("response_format", "structured_outputs", *GUIDED_FIELDS) if _given(body, name)
    ]
    if len(sources) > 1:
        raise GrammarInvalid(sources[1], f"send one output constraint, not {' and '.join(sources)}")
    if not sources:
        return None
    name = sources[0]
    value = getattr(body, name)
    if name == "response_format":
        return _response_format(value)
    if name == "structured_outputs":
        return _structured_outputs(value)
    return _one(name.removeprefix("guided_"), value, name)


def _given(body: Any, name: str) -> bool:
    value = getattr(body, name, None)
    return value is not None and value != {"type": "text"}


def _response_format(value: Any) -> GrammarSpec:
    if not isinstance(value, dict):
        raise GrammarInvalid("response_format", "must be an object with a 'type'")
    kind = value.get("type")
    if kind == "json_object":
        return GrammarSpec.json_object("response_format")
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, dict) or "schema" not in inner:
            raise GrammarInvalid("response_format.json_schema", "must be an object with a 'schema'")
        return GrammarSpec.json_schema(inner["schema"], "response_format.json_schema.schema")
    raise GrammarInvalid("response_format.type", f"must be text, json_object or json_schema, got {kind!r}")


def _structured_outputs(value: Any) -> GrammarSpec:
    if not isinstance(value, dict):
        raise GrammarInvalid("structured_outputs", "must be an object")
    keys = [k for k, v in value.items() if v is not None]
    unknown = sorted(set(keys) - STRUCTURED_KEYS)
    if unknown:
        raise GrammarInvalid(f"structured_outputs.{unknown[0]}", "unknown key (json, regex, choice, grammar)")
    if len(keys) != 1:
        raise GrammarInvalid("structured_outputs", "give exactly one of json, regex, choice, grammar")
    key = keys[0]
    return _one(key, value[key], f"structured_outputs.{key}")


def _one(kind: str, value: Any, param: str) -> GrammarSpec:
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise GrammarInvalid(param, f"is not valid JSON ({e})") from e
        return GrammarSpec.json_schema(value, param)
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise GrammarInvalid(param, "must be a non-empty regular expression")
        return GrammarSpec.regex(value, param)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise GrammarInvalid(param, "must be a non-empty list of non-empty strings")
        return GrammarSpec.choice(value, param)
    if not isinstance(value, str) or not value.strip():
        raise GrammarInvalid(param, 'must be a grammar (GBNF, e.g. root ::= "yes" | "no")')
    return GrammarSpec.ebnf(value, param)
