"""Bounds on how many digits a JSON number may have, so a model cannot write digits until ``max_tokens``.

llguidance has no length option for JSON numbers: ``{"type": "integer"}`` allows any number of digits,
and ``{"type": "number"}`` any fraction and exponent, even with ``minimum``/``maximum``. A small model
sampling at temperature 1 then often writes ``"n": 23660786718223271198118741948236…`` until the row
hits its length limit, and the output is not JSON at all. So before compiling, every integer or number
schema gets what it lacks of these caps (a narrower set of numbers, each still valid for the schema):

- integers: at most :data:`MAX_INTEGER_DIGITS` digits (``minimum`` / ``maximum`` of ±(10^15 - 1)),
- numbers: the same range and at most :data:`MAX_FRACTION_DIGITS` fraction digits (``multipleOf``
  1e-6, which also rules out the exponent form).

A bound the schema gives itself (``minimum``, ``exclusiveMaximum``, ``multipleOf`` …) is kept.
"""

from __future__ import annotations

from typing import Any

MAX_INTEGER_DIGITS = 15
MAX_FRACTION_DIGITS = 6
LARGEST = 10**MAX_INTEGER_DIGITS - 1
FRACTION_STEP = 10.0**-MAX_FRACTION_DIGITS
DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})  # their values are JSON, not schemas


def cap_numbers(schema: Any) -> Any:
    """A copy of ``schema`` with the digit caps added to each integer / number schema inside it."""
    if isinstance(schema, list):
        return [cap_numbers(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    capped = {key: value if key in DATA_KEYWORDS else cap_numbers(value) for key, value in schema.items()}
    kind = schema.get("type")
    if kind in ("integer", "number"):
        if "minimum" not in schema and "exclusiveMinimum" not in schema:
            capped["minimum"] = -LARGEST
        if "maximum" not in schema and "exclusiveMaximum" not in schema:
            capped["maximum"] = LARGEST
        if kind == "number" and "multipleOf" not in schema:
            capped["multipleOf"] = FRACTION_STEP
    return capped
