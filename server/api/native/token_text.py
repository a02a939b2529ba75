"""Each generated token's own text, as TGI reports it in token events.

Decoding one id alone breaks multi-byte characters and drops the leading space that SentencePiece and
byte-level BPE tokenizers attach from context, so a token's text is the difference between decoding
a short window with and without it (TGI's ``prefix_offset``/``read_offset`` scheme); a token that
ends in the middle of a character has empty text and the character appears with the token that
completes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

INCOMPLETE = "\ufffd"  # what a tokenizer decodes a partial UTF-8 sequence to


@dataclass
class TokenTexts:
    """Incremental per-token decoding of one sequence (special tokens keep their text)."""

    tokenizer: object
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0

    def add(self, token_id: int) -> str:
        """Appends ``token_id`` and returns the text it completes (possibly empty)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith(INCOMPLETE):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before) :]
        return ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if ids else ""
