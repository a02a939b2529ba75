"""Structured outputs: JSON schema / regex / choice / grammar / tool-call constraints as token masks.

The API thread turns a request into a :class:`GrammarSpec` and calls ``GrammarCompiler.compile``
(cached, bounded, raises :class:`GrammarInvalid`); the engine thread gives each constrained row a
``RowGrammar`` (``compiled.new_row()``), fills the rows' bitmasks each step, applies them to the logits
in one call, and feeds every sampled token back with ``accept``. See ``compiler.py`` for the library
choice and its figures.
"""

from server.engine.structured.compiler import CompiledGrammar, GrammarCompiler
from server.engine.structured.row_grammar import GrammarRowFailed, GrammarVocab, RowGrammar, fill_masks
from server.engine.structured.spec import GrammarInvalid, GrammarSpec, ToolCallFormat
from server.engine.structured.token_mask import allocate_bitmask, allowed_ids, apply_token_bitmask_

__all__ = [
    "CompiledGrammar",
    "GrammarCompiler",
    "GrammarInvalid",
    "GrammarRowFailed",
    "GrammarSpec",
    "GrammarVocab",
    "RowGrammar",
    "ToolCallFormat",
    "allocate_bitmask",
    "allowed_ids",
    "apply_token_bitmask_",
    "fill_masks",
]
