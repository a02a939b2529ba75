"""Automatic prefix caching that knows about adapters: reuse the keys and values of a prompt's start.

A prompt's tokens are cut into blocks of :data:`BLOCK_TOKENS`. Block ``i`` is keyed by a chain hash
of the blocks before it and its own tokens, rooted at the *model identity* of the row: its adapter
slot, that slot's generation (it changes whenever an adapter is installed into or cleared from the
slot) and the request's cache salt (its tenant). A LoRA on ``k_proj``/``v_proj`` — or on any layer
below them — changes every key and value, so a block computed under one adapter is never served to a
row of another (TGI switches its prefix cache off under LoRA for this reason; SGLang keys its radix
tree by the LoRA id since its PR #7216). Salting by tenant keeps one tenant from learning, through a
faster first token, which prompts another tenant sent.

Entries are evicted least recently used within a byte budget. A hit hands the runner the cached
keys and values as a per-prompt prefix (``adapters.prefix_tuning.PrefixKV``, the same path a
prefix-tuning adapter uses): the prompt's remaining tokens attend to it and take the positions after
it. The last token of a prompt is always computed, since its logits start the generation.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK_TOKENS = 16


@dataclass
class _Block:
    parent: int  # the key of the block before (or the root)
    tokens: tuple[int, ...]  # checked on every hit, so a hash collision is a miss, never a wrong answer
    slot: int
    kv: torch.Tensor  # (2, num_layers, kv_heads, BLOCK_TOKENS, head_dim): keys then values

    @property
    def num_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass
class PrefixCacheStats:
    lookups: int = 0
    hit_tokens: int = 0  # prompt tokens whose keys and values came from the cache
    looked_up_tokens: int = 0  # prompt tokens of every lookup
    inserted_blocks: int = 0
    evicted_blocks: int = 0


@dataclass(frozen=True)
class CachedPrefix:
    """The cached start of one prompt."""

    num_tokens: int
    keys: torch.Tensor  # (num_layers, kv_heads, num_tokens, head_dim)
    values: torch.Tensor  # (num_layers, kv_heads, num_tokens, head_dim)


class PrefixCache:
    """Blocks of prompt keys and values, keyed by model identity and tokens, LRU within ``budget_bytes``.

    Args:
        budget_bytes: the most bytes of keys and values held; 0 disables the cache.
        block_tokens: tokens per block (reuse is at block granularity).
    """

    def __init__(self, budget_bytes: int, block_tokens: int = BLOCK_TOKENS):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.block_tokens = block_tokens
        self.stats = PrefixCacheStats()
        self._blocks: OrderedDict[int, _Block] = OrderedDict()  # oldest first
        self._bytes = 0
        self._lock = threading.Lock()  # lookups run in the prefill thread, invalidation in an API thread

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    @property
    def num_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._blocks)

    @staticmethod
    def root(slot: int, generation: int, salt: str) -> int:
        """The chain's root key for a row's model identity."""
        return hash(("loraplex-prefix", slot, generation, salt))

    def _chain(self, root: int, tokens: list[int], num_blocks: int) -> list[tuple[int, int, tuple]]:
        """``(parent key, key, tokens)`` of the first ``num_blocks`` blocks of ``tokens``."""
        out, parent, b = [], root, self.block_tokens
        for i in range(num_blocks):
            block = tuple(tokens[i * b : (i + 1) * b])
            key = hash((parent, block))
            out.append((parent, key, block))
            parent = key
        return out

    def lookup(self, root: int, tokens: list[int]) -> CachedPrefix | None:
        """The longest cached run of whole blocks at the start of ``tokens``, leaving at least the last
        token to compute; None when not even the first block is cached."""
        if not self.enabled:
            return None
        found: list[_Block] = []
        with self._lock:
            self.stats.lookups += 1
            self.stats.looked_up_tokens += len(tokens)
            for parent, key, block in self._chain(root, tokens, (len(tokens) - 1) // self.block_tokens):
                entry = self._blocks.get(key)
                if entry is None or entry.parent != parent or entry.tokens != block:
                    break
                found.append(entry)
            for entry_key in reversed([k for _, k, _ in self._chain(root, tokens, len(found))]):
                self._blocks.move_to_end(entry_key)  # children first: a parent stays younger than them
            if not found:
                return None
            self.stats.hit_tokens += len(found) * self.block_tokens
            kv = torch.cat([entry.kv for entry in found], dim=3)  # (2, L, KVH, n, D)
        return CachedPrefix(kv.shape[3], kv[0], kv[1])

    def insert(
        self,
        root: int,
        slot: int,
        tokens: list[int],
        layers: list[tuple[torch.Tensor, torch.Tensor]],
        skip_blocks: int = 0,
    ) -> int:
        """Stores the whole blocks of a prefilled prompt; returns how many blocks were added.

        Args:
            root: the row's :meth:`root`.
            slot: its adapter slot (for :meth:`invalidate_slot`).
            tokens: the prompt's token ids.
            layers: per layer ``(1, kv_heads, len(tokens), head_dim)`` keys and values of those tokens.
            skip_blocks: leading blocks known to be cached already (the lookup's hit).
        """
        b = self.block_tokens
        chain = self._chain(root, tokens, len(tokens) // b)
        if not self.enabled or len(chain) <= skip_blocks:
            return 0
        with self._lock:
            new = [i for i in range(skip_blocks, len(chain)) if chain[i][1] not in self._blocks]
        if not new:
            return 0
        first, last = new[0] * b, (new[-1] + 1) * b
        stacked = torch.stack(
            [
                torch.stack([k[0, :, first:last] for k, _ in layers]),
                torch.stack([v[0, :, first:last] for _, v in layers]),
            ]
        )  # (2, L, KVH, last - first, D): one copy, then one compact clone per block
        added = 0
        with self._lock:
            for i in new:
                parent, key, block = chain[i]
                kv = stacked[:, :, :, i * b - first : (i + 1) * b - first].clone()
                entry = _Block(parent, block, slot, kv)
                if entry.num_bytes > self.budget_bytes or key in self._blocks:
                    continue
                self._blocks[key] = entry
                self._bytes += entry.num_bytes
                self.stats.inserted_blocks += 1
                added += 1
            # a prompt's earlier blocks stay younger than its later ones, so leaves are evicted first
            for _, key, _ in reversed(chain):
                if key in self._blocks:
                    self._blocks.move_to_end(key)
            self._evict_to_budget()
        return added

    def _evict_to_budget(self) -> None:
        while self._bytes > self.budget_bytes and self._blocks:
            _, entry = self._blocks.popitem(last=False)
            self._bytes -= entry.num_bytes
            self.stats.evicted_blocks += 1

    def invalidate_slot(self, slot: int) -> int:
        """Drops every block computed under ``slot`` (its adapter was replaced); returns how many."""
        with self._lock:
            stale = [key for key, entry in self._blocks.items() if entry.slot == slot]
            for key in stale:
                self._bytes -= self._blocks.pop(key).num_bytes
        return len(stale)

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._bytes = 0
