"""Token log-probabilities in OpenAI's two wire shapes (chat's ``content`` list, completions' arrays).

The values come from the engine (:class:`~server.engine.types.TokenLogprob`): the log-softmax of the
row's own scores (its adapter or merge) before penalties, ``logit_bias``, temperature and top-k/top-p.
A token's text is its own decoding; a byte-level token that ends inside a character decodes to U+FFFD.
"""

from __future__ import annotations

from functools import lru_cache

from server.engine.types import TokenLogprob


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character standing for each byte, reversed.

    Byte-level tokenizers (GPT-2, Llama 3, SmolLM2) spell every byte as one printable character;
    mapping a token's spelling back gives its exact bytes, also for a token that ends mid-character.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    stand_ins, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            stand_ins[chr(byte)] = byte
        else:
            stand_ins[chr(256 + extra)] = byte
            extra += 1
    return stand_ins


_BYTE_LEVEL = _byte_level_alphabet()


class LogprobFormatter:
    """Turns token ids and logprobs into OpenAI's shapes with the serving tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._text = lru_cache(maxsize=65536)(lambda token: tokenizer.decode([token]))
        self._bytes = lru_cache(maxsize=65536)(self._token_bytes)

    def text(self, token: int) -> str:
        return self._text(token)

    def _token_bytes(self, token: int) -> list[int]:
        spelling = self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(spelling, str) and spelling and all(c in _BYTE_LEVEL for c in spelling):
            return [_BYTE_LEVEL[c] for c in spelling]
        return list(self.text(token).encode("utf-8"))

    def _entry(self, token: int, logprob: float) -> dict:
        return {"token": self.text(token), "logprob": logprob, "bytes": self._bytes(token)}

    def chat_content(self, items: list[TokenLogprob]) -> list[dict]:
        """``choices[].logprobs.content``: one entry per token with its ``top_logprobs``."""
        return [
            {**self._entry(i.token_id, i.logprob), "top_logprobs": [self._entry(t, lp) for t, lp in i.top]}
            for i in items
        ]

    def completion(self, items: list[TokenLogprob | int], text_offset: int = 0) -> dict:
        """Completions' ``logprobs``: ``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``.

        A bare token id (the first prompt token under ``echo``) has no logprob and no alternatives.
        """
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        offset = text_offset
        for item in items:
            scored = isinstance(item, TokenLogprob)
            text = self.text(item.token_id if scored else item)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            token_logprobs.append(item.logprob if scored else None)
            top_logprobs.append({self.text(t): lp for t, lp in item.top} if scored else None)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }


@lru_cache(maxsize=8)  # one per tokenizer served (tests build many apps)
def formatter_for(tokenizer) -> LogprobFormatter:
    """The serving tokenizer's formatter, made once: its per-token caches outlive each request."""
    return LogprobFormatter(tokenizer)
