"""Compiling grammar specs for one tokenizer, once each (an LRU cache), within size and time limits.

Library choice: **llguidance** (1.9.1) over xgrammar (0.2.9). Measured by ``python -m
benchmarks.grammar_bench --repeats 7`` on the SmolLM2 tokenizer (49,152 ids), Intel Xeon (2 cores shared,
load ~2.5), 1 torch thread; medians, the range over three runs where they differed:

| grammar | library | compile ms | first mask µs | mask µs/row/step | memory KiB |
|---|---|---:|---:|---:|---:|
| JSON schema, 6 properties (76 tokens) | xgrammar | 5.2-18 | 18-41 | 1-2 | 91 |
| JSON schema, 6 properties (76 tokens) | llguidance | 1.0-1.1 | 78-85 | 9-10 | n/a |
| json_object (76 tokens) | xgrammar | 4.8-5.4 | 11-18 | 3 | 121 |
| json_object (76 tokens) | llguidance | 0.4-0.5 | 44-60 | 6-7 | n/a |
| regex, phone number (17 tokens) | xgrammar | 0.1-0.2 | 1-2 | 1 | 8 |
| regex, phone number (17 tokens) | llguidance | 1.0-1.2 | 34-43 | 19-21 | n/a |
| choice of 4 phrases (3 tokens) | xgrammar | 0.3-0.4 | 2-3 | 1 | 17 |
| choice of 4 phrases (3 tokens) | llguidance | 0.7-0.8 | 41-47 | 23-26 | n/a |

xgrammar fills a mask 5-20x faster, but both are far below a decode step: 10-25 µs x 32 rows is under
1 ms, against ~220 ms for a batch-32 CPU step of SmolLM2-135M. Applying the masks is the larger cost
and is library-independent here (``token_mask.apply_token_bitmask_``: 0.2 / 1.8 / 7 ms for 1 / 8 / 32
rows, xgrammar's C++ kernel 0.1 / 1 / 3.9 ms). What decided it:

- Keywords: xgrammar silently ignores ``not``, ``if``/``then``, ``uniqueItems`` and ``multipleOf`` on
  numbers (a log line, then output that can violate the schema); llguidance refuses them with
  ``Unimplemented keys: ["not"]``. A constraint accepted and not enforced is the worse failure.
- Limits: llguidance bounds work per grammar and per step (lexer fuel, Earley items, grammar size) and
  reports the limit hit; xgrammar has no compile limit, so a hostile schema holds a thread.
- Compile: llguidance builds a matcher in ~1 ms (its lexer grows lazily), xgrammar precomputes ~5 ms.
- Regex: llguidance takes Unicode classes (``\\p{L}``); xgrammar refuses them.
- Tool calls in free text: llguidance's lazy lexemes end the free text at ``<tool_call>`` in plain Lark.
- Threads: llguidance builds matchers with the GIL released, and matchers are independent objects.

Memory: xgrammar reports its compiled size; llguidance exposes none (its compiled form is the grammar
text plus a lexer that each matcher grows as it goes).

Compiling here means building llguidance's matcher for the grammar and computing its first mask (which
surfaces lexer errors and limits); the cached matcher is a template, deep-copied for every row.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.engine.structured.llg_grammar import to_llguidance
from server.engine.structured.row_grammar import GrammarVocab, RowGrammar
from server.engine.structured.spec import GrammarInvalid, GrammarSpec
from server.engine.structured.token_mask import allocate_bitmask

logger = logging.getLogger(__name__)

MAX_ERROR_CHARS = 600  # llguidance quotes grammar lines in its errors; keep the message readable


@dataclass
class CompiledGrammar:
    """A grammar ready to constrain rows: ``new_row()`` gives each generating row its own matcher."""

    spec: GrammarSpec
    vocab: GrammarVocab
    compile_ms: float
    _template: Any  # an llguidance.LLMatcher in its start state, never advanced
    _lock: threading.Lock

    def new_row(self) -> RowGrammar:
        """A fresh matcher at the start of the grammar (cheap: a copy of the template)."""
        with self._lock:
            matcher = self._template.deep_copy()
        return RowGrammar(matcher, self.vocab)


class GrammarCompiler:
    """Compiles :class:`GrammarSpec` s for one tokenizer; thread-safe, cached per spec hash.

    Compiles run on the calling (API) thread's behalf in a worker thread bounded by
    ``compile_timeout_s``; rows made from the result are used on the engine thread.

    Args:
        tokenizer: a Hugging Face fast tokenizer.
        vocab_size: the model's logits width (may exceed ``len(tokenizer)``; extra ids are never allowed).
        eos_token_ids: the ids that end a row; default the tokenizer's ``eos_token_id``.
        max_schema_bytes: the largest spec payload accepted.
        compile_timeout_s: the longest a compile may take.
        cache_size: how many compiled grammars are kept (least recently used evicted).
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: Sequence[int] | None = None,
        max_schema_bytes: int = 64 * 1024,
        compile_timeout_s: float = 10.0,
        cache_size: int = 256,
    ):
        import llguidance.hf

        eos_ids = list(eos_token_ids) if eos_token_ids is not None else [tokenizer.eos_token_id]
        if vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} ids")
        if not eos_ids or any(i is None or not 0 <= i < len(tokenizer) for i in eos_ids):
            raise ValueError(f"eos_token_ids {eos_ids} must be ids of the tokenizer")
        for name, value in (
            ("max_schema_bytes", max_schema_bytes),
            ("compile_timeout_s", compile_timeout_s),
            ("cache_size", cache_size),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.vocab = GrammarVocab.build(vocab_size, len(tokenizer), eos_ids)
        self.max_schema_bytes = max_schema_bytes
        self.compile_timeout_s = compile_timeout_s
        self.cache_size = cache_size
        self._ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_ids)
        self._tokenizer_key = f"{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}:{vocab_size}"
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar for ``spec``, from the cache when it was compiled before.

        Raises:
            GrammarInvalid: the spec is malformed, uses an unsupported keyword, or is over a limit.
        """
        key = (spec.digest, self._tokenizer_key)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        self._check_size(spec)
        compiled = self._compile_within_deadline(spec)
        with self._lock:
            compiled = self._cache.setdefault(key, compiled)  # a racing compile of the same spec wins
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def cached_count(self) -> int:
        """How many grammars the cache holds."""
        with self._lock:
            return len(self._cache)

    def _check_size(self, spec: GrammarSpec) -> None:
        size = spec.payload_bytes
        if size > self.max_schema_bytes:
            raise GrammarInvalid(
                spec.param,
                f"it is {size} bytes, over the limit of {self.max_schema_bytes} bytes (max_schema_bytes)",
            )

    def _compile_within_deadline(self, spec: GrammarSpec) -> CompiledGrammar:
        """Compile in a worker thread; past the deadline the result is abandoned (the work is bounded by
        llguidance's own limits, so the thread ends soon after)."""
        future: concurrent.futures.Future[CompiledGrammar] = concurrent.futures.Future()

        def work() -> None:
            try:
                future.set_result(self._build(spec))
            except BaseException as e:  # handed to the waiting caller below
                future.set_exception(e)

        threading.Thread(target=work, name="grammar-compile", daemon=True).start()
        try:
            return future.result(timeout=self.compile_timeout_s)
        except concurrent.futures.TimeoutError as e:
            logger.warning("grammar compile over %ss abandoned (%s)", self.compile_timeout_s, spec.kind)
            raise GrammarInvalid(
                spec.param,
                f"compiling it took longer than the limit of {self.compile_timeout_s} s (compile_timeout_s)",
            ) from e

    def _build(self, spec: GrammarSpec) -> CompiledGrammar:
        import llguidance

        start = time.perf_counter()
        grammar = to_llguidance(spec)
        try:
            matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0)
            if not matcher.is_error():  # the first mask builds the lexer: its errors and limits show here
                bitmask = allocate_bitmask(1, self.vocab.vocab_size)
                matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * bitmask.element_size())
        except Exception as e:  # llguidance reports grammar errors in-band; anything raised is unexpected
            logger.warning("llguidance raised compiling a %s grammar: %s", spec.kind, e)
            raise GrammarInvalid(spec.param, f"it could not be compiled ({type(e).__name__}: {e})") from e
        if matcher.is_error():
            raise GrammarInvalid(spec.param, matcher.get_error()[:MAX_ERROR_CHARS].strip())
        matcher.reset()
        compile_ms = (time.perf_counter() - start) * 1e3
        logger.debug("compiled %s grammar %s in %.1f ms", spec.kind, spec.digest[:12], compile_ms)
        return CompiledGrammar(spec, self.vocab, compile_ms, matcher, threading.Lock())
