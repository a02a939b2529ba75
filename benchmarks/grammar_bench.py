"""xgrammar against llguidance on the default model's tokenizer: compile time, mask time, memory.

Run: ``python -m benchmarks.grammar_bench [--repeats N] [--tokenizer DIR]``; with ``--step``, the cost
of constrained rows in a batch-32 decode step (``benchmarks/grammar_step_bench.py``).
Prints a Markdown table of medians over the repeats. Each library compiles every grammar from nothing
(xgrammar's own cache off);
"compile" is spec → a matcher ready for its first mask, "first mask" is that first mask alone, "mask"
is the median fill time of one row's bitmask per step while walking a valid output token by token
(the output is the tokenizer's own encoding of a valid document, as a model would produce it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# A typical tool / extraction schema: strings, an enum, a bounded integer, a nested array of objects.
TYPICAL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "email": {"type": "string"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "active": {"type": "boolean"},
        "addresses": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"],
            },
        },
    },
    "required": ["name", "email", "role", "age", "active", "addresses"],
}
TYPICAL_DOCUMENT = {
    "name": "Ada Lovelace",
    "email": "ada@example.org",
    "role": "editor",
    "age": 36,
    "active": True,
    "addresses": [{"city": "London", "zip": "W1 2AB"}, {"city": "Paris", "zip": "75001"}],
}
REGEX = r"\d{3}-\d{3}-\d{4}( ext\. \d{1,5})?"
REGEX_TEXT = "555-867-5309 ext. 42"
CHOICES = ["strongly positive", "somewhat negative", "neutral but uncertain", "mixed feelings"]
CHOICE_TEXT = "neutral but uncertain"


@dataclass
class Case:
    name: str
    kind: str  # "json_schema" | "json_object" | "regex" | "choice"
    payload: object
    text: str


CASES = [
    Case("json_schema (6 props)", "json_schema", TYPICAL_SCHEMA, json.dumps(TYPICAL_DOCUMENT)),
    Case("json_object", "json_object", None, json.dumps(TYPICAL_DOCUMENT)),
    Case("regex (phone)", "regex", REGEX, REGEX_TEXT),
    Case("choice (4)", "choice", CHOICES, CHOICE_TEXT),
]


def choice_regex(choices: list[str]) -> str:
    """A regex matching exactly one of ``choices``."""
    import re

    return "(" + "|".join(re.escape(c) for c in choices) + ")"


class XGrammarBackend:
    name = "xgrammar 0.2.9"

    def __init__(self, tokenizer, vocab_size: int):
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def compile(self, case: Case):
        if case.kind == "json_schema":
            compiled = self.compiler.compile_json_schema(json.dumps(case.payload))
        elif case.kind == "json_object":
            compiled = self.compiler.compile_builtin_json_grammar()
        else:
            regex = case.payload if case.kind == "regex" else choice_regex(case.payload)
            compiled = self.compiler.compile_regex(regex)
        return compiled, self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher) -> None:
        matcher.fill_next_token_bitmask(self.bitmask)

    def accept(self, matcher, token_id: int) -> bool:
        return matcher.accept_token(token_id)

    def memory_bytes(self, compiled) -> int:
        return compiled.memory_size_bytes


class LLGuidanceBackend:
    name = "llguidance 1.9.1"

    def __init__(self, tokenizer, vocab_size: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.llg_torch = llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)

    def compile(self, case: Case):
        matcher_cls = self.llg.LLMatcher
        if case.kind == "json_schema":
            grammar = matcher_cls.grammar_from_json_schema(
                json.dumps(case.payload), defaults={"whitespace_flexible": True}
            )
        elif case.kind == "json_object":
            grammar = matcher_cls.grammar_from_json_schema(
                '{"type": "object"}', defaults={"whitespace_flexible": True}
            )
        else:
            regex = case.payload if case.kind == "regex" else choice_regex(case.payload)
            grammar = matcher_cls.grammar_from_regex(regex)
        matcher = matcher_cls(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise RuntimeError(matcher.get_error())
        return grammar, matcher

    def fill(self, matcher) -> None:
        self.llg_torch.fill_next_token_bitmask(matcher, self.bitmask)

    def accept(self, matcher, token_id: int) -> bool:
        return matcher.consume_token(token_id)

    def memory_bytes(self, compiled) -> int | None:
        return None  # llguidance exposes no size (its grammar is text; lexer states grow per matcher)


def timed_ms(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return (time.perf_counter() - start) * 1e3, result


def walk_us(backend, matcher, token_ids: list[int]) -> tuple[float, list[float]]:
    """The first mask's time and every later mask's time (µs) along ``token_ids``."""
    times = []
    for token_id in token_ids:
        start = time.perf_counter()
        backend.fill(matcher)
        times.append((time.perf_counter() - start) * 1e6)
        if not backend.accept(matcher, token_id):
            raise RuntimeError(f"{backend.name} rejected token {token_id}")
    return times[0], times[1:]


def measure(backend, case: Case, token_ids: list[int], repeats: int) -> dict[str, float | None]:
    compile_ms, first_us, step_us = [], [], []
    compiled = None
    for _ in range(repeats):
        ms, (compiled, matcher) = timed_ms(lambda: backend.compile(case))
        compile_ms.append(ms)
        first, steps = walk_us(backend, matcher, token_ids)
        first_us.append(first)
        step_us.extend(steps)
    memory = backend.memory_bytes(compiled)
    return {
        "compile_ms": statistics.median(compile_ms),
        "first_mask_us": statistics.median(first_us),
        "mask_us": statistics.median(step_us) if step_us else float("nan"),
        "mask_p90_us": statistics.quantiles(step_us, n=10)[-1] if len(step_us) > 1 else float("nan"),
        "memory_kib": memory / 1024 if memory is not None else None,
    }


def apply_us(apply, batch_size: int, vocab_size: int, repeats: int) -> float:
    """Median time (µs) of masking a ``(batch_size, vocab_size)`` float32 logits tensor in place."""
    bitmask = torch.randint(-(2**31), 2**31 - 1, (batch_size, (vocab_size + 31) // 32), dtype=torch.int32)
    times = []
    for _ in range(repeats * 5):
        logits = torch.randn(batch_size, vocab_size)
        start = time.perf_counter()
        apply(logits, bitmask)
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def print_apply_table(vocab_size: int, repeats: int) -> None:
    import xgrammar

    from server.engine.structured.token_mask import apply_token_bitmask_

    print("\n| batched apply, CPU float32 | B = 1 µs | B = 8 µs | B = 32 µs |")
    print("|---|---:|---:|---:|")
    for name, apply in (
        ("loraplex apply_token_bitmask_ (numpy unpackbits)", apply_token_bitmask_),
        ("xgrammar apply_token_bitmask_inplace (C++)", xgrammar.apply_token_bitmask_inplace),
    ):
        cells = " | ".join(f"{apply_us(apply, b, vocab_size, repeats):.0f}" for b in (1, 8, 32))
        print(f"| {name} | {cells} |")


def load_tokenizer(folder: str | None):
    from transformers import AutoTokenizer

    if folder is None:
        from adapters.base_model import resolve_base_model

        folder = str(resolve_base_model(None, Path.home() / ".cache" / "loraplex"))
    return AutoTokenizer.from_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the converted base)")
    parser.add_argument(
        "--step", action="store_true", help="step overhead of 0-32 constrained rows (grammar_step_bench)"
    )
    args, rest = parser.parse_known_args()
    if args.step:
        from benchmarks.grammar_step_bench import run

        run(rest + (["--tokenizer", args.tokenizer] if args.tokenizer else []))
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(args.tokenizer)
    vocab_size = len(tokenizer)
    backends = [XGrammarBackend(tokenizer, vocab_size), LLGuidanceBackend(tokenizer, vocab_size)]
    print(f"tokenizer vocab {vocab_size}, {args.repeats} repeats, medians\n")
    print("| grammar | library | compile ms | first mask µs | mask µs/row/step (p90) | tokens | memory KiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for case in CASES:
        token_ids = tokenizer.encode(case.text, add_special_tokens=False)
        for backend in backends:
            r = measure(backend, case, token_ids, args.repeats)
            memory = f"{r['memory_kib']:.0f}" if r["memory_kib"] is not None else "n/a"
            print(
                f"| {case.name} | {backend.name} | {r['compile_ms']:.1f} | {r['first_mask_us']:.0f} | "
                f"{r['mask_us']:.0f} ({r['mask_p90_us']:.0f}) | {len(token_ids)} | {memory} |"
            )
    print_apply_table(vocab_size, args.repeats)


if __name__ == "__main__":
    main()
