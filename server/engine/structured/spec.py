"""What a request constrains its output to: a grammar spec, its canonical hash, and the error it raises."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

GrammarKind = Literal["json_object", "json_schema", "regex", "choice", "lark", "ebnf", "tool_calls"]
GRAMMAR_KINDS: tuple[str, ...] = (
    "json_object",
    "json_schema",
    "regex",
    "choice",
    "lark",
    "ebnf",
    "tool_calls",
)

MAX_PARALLEL_TOOL_CALLS = 8  # calls in one output with parallel_tool_calls (see ToolCallFormat)

# Where each kind comes from on the wire, for error messages when the caller names nothing else.
DEFAULT_PARAMS: dict[str, str] = {
    "json_object": "response_format",
    "json_schema": "response_format.json_schema.schema",
    "regex": "structured_outputs.regex",
    "choice": "structured_outputs.choice",
    "lark": "structured_outputs.grammar",
    "ebnf": "structured_outputs.grammar",
    "tool_calls": "tools",
}


class GrammarInvalid(ValueError):
    """A grammar spec that cannot be compiled: bad or unsupported syntax, over a size or time limit.

    Attributes:
        param: the request field the spec came from (``response_format.json_schema.schema`` …).
        reason: what is wrong, naming the keyword or the limit.
    """

    code = "grammar_invalid"

    def __init__(self, param: str, reason: str):
        super().__init__(f"Invalid {param}: {reason}")
        self.param = param
        self.reason = reason


@dataclass(frozen=True)
class ToolCallFormat:
    """How a tool call is written in the output: ``begin`` + JSON ``{"name", "arguments"}`` + ``end``.

    ``mode`` is ``required`` (the output is only calls), ``auto`` (free text, and calls once ``begin`` is
    written), or a tool's name (one call of that tool). ``tools`` pairs each name with its parameters
    JSON schema, as canonical JSON text so the spec stays hashable. With ``parallel`` at most
    ``max_calls`` calls are written, then only EOS: a small model that prefers another ``<tool_call>``
    to ending would otherwise repeat calls until ``max_tokens`` and cut the last one off.
    """

    tools: tuple[tuple[str, str], ...]
    mode: str = "required"
    parallel: bool = True
    begin: str = "<tool_call>"
    end: str = "</tool_call>"
    max_calls: int = MAX_PARALLEL_TOOL_CALLS


@dataclass(frozen=True)
class GrammarSpec:
    """One structured-output constraint, hashable and canonical (equal specs compile once).

    ``payload`` by kind: json_object → None; json_schema → the schema as canonical JSON text; regex,
    lark, ebnf → the grammar text; choice → a tuple of strings; tool_calls → a :class:`ToolCallFormat`.
    Build them with the ``from_*`` constructors, which canonicalise. ``param`` only labels errors.
    """

    kind: GrammarKind
    payload: str | tuple[str, ...] | ToolCallFormat | None = None
    param: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise GrammarInvalid(self.param or "structured_outputs", f"unknown grammar kind {self.kind!r}")
        if not self.param:
            object.__setattr__(self, "param", DEFAULT_PARAMS[self.kind])

    @classmethod
    def json_object(cls, param: str = "") -> GrammarSpec:
        """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
        return cls("json_object", None, param)

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool, param: str = "") -> GrammarSpec:
        """A JSON document valid against ``schema``."""
        if not isinstance(schema, (dict, bool)):
            raise GrammarInvalid(param or DEFAULT_PARAMS["json_schema"], "a JSON schema must be an object")
        return cls("json_schema", canonical_json(schema), param)

    @classmethod
    def regex(cls, pattern: str, param: str = "") -> GrammarSpec:
        """Text that fully matches ``pattern``."""
        return cls("regex", pattern, param)

    @classmethod
    def choice(cls, choices: list[str] | tuple[str, ...], param: str = "") -> GrammarSpec:
        """Exactly one of ``choices``."""
        return cls("choice", tuple(choices), param)

    @classmethod
    def lark(cls, grammar: str, param: str = "") -> GrammarSpec:
        """A Lark grammar (llguidance's dialect: ``start:`` rule, ``%json``, regex terminals)."""
        return cls("lark", grammar, param)

    @classmethod
    def ebnf(cls, grammar: str, param: str = "") -> GrammarSpec:
        """A GBNF grammar (llama.cpp's EBNF: ``root ::= …``)."""
        return cls("ebnf", grammar, param)

    @property
    def digest(self) -> str:
        """A stable hash of kind and payload (the cache key, with the tokenizer)."""
        return hashlib.sha256(
            canonical_json([self.kind, payload_jsonable(self.payload)]).encode()
        ).hexdigest()

    @property
    def payload_bytes(self) -> int:
        """The size of the payload as compiled, for the schema-size limit."""
        return len(canonical_json(payload_jsonable(self.payload)).encode())


def canonical_json(value: Any) -> str:
    """Compact JSON text: equal documents written in the same key order give equal text.

    Keys are not sorted: the order of a schema's ``properties`` is the order the output writes them in,
    so two schemas that differ only in that order are different constraints.
    """
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def payload_jsonable(payload: Any) -> Any:
    """The payload as plain JSON values (tuples as lists, a ToolCallFormat as a dict)."""
    if isinstance(payload, ToolCallFormat):
        return {
            "tools": [[name, params] for name, params in payload.tools],
            "mode": payload.mode,
            "parallel": payload.parallel,
            "begin": payload.begin,
            "end": payload.end,
            "max_calls": payload.max_calls,
        }
    if isinstance(payload, tuple):
        return list(payload)
    return payload
