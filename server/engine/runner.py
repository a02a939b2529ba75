"""One forward pass at a time over the running batch; every row carries its adapter slot."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from adapters.batched_lora import BatchedLoRAModel
from adapters.prefix_tuning import PrefixKV
from server.engine.attention import use_engine_attention
from server.engine.kv_cache import BatchKVCache
from server.engine.llama_decode import LlamaDecodeStep, supports_fast_decode
from server.engine.prefix_attention import PREFIX_KV_KWARG
from server.engine.prefix_cache import CachedPrefix, PrefixCache
from server.engine.types import TokenLogprob


@dataclass
class Prefilled:
    """A prompt's prefill result before it joins the batch: last logits and per-layer K/V."""

    logits: torch.Tensor  # (V,)
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (1, kv_heads, T, head_dim) K and V
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1..T-1, when asked for
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    # prompt tokens ``layers`` covers: the whole prompt, or fewer after a chunk of a chunked prefill
    # (then ``layers`` is where the next chunk starts and ``logits`` are not the prompt's last)
    prompt_tokens: int = 0


class ModelRunner:
    """Owns the model's forward passes and the running batch's KV cache.

    Prefill packs the new prompts end to end into one sequence (one matrix per linear layer for all of
    their tokens; each prompt attends to itself only and uses its own adapter for its token range), so
    a prompt's prefill does not depend on what else is prefilled with it. Decode runs one token for
    every running row together, each row with its own adapter, in a single forward pass; on a CUDA
    device with ``cuda_graphs``, a Llama-family decode step replays from a CUDA graph per batch-size
    bucket (``server/engine/cuda_graphs.py``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        lora: BatchedLoRAModel,
        device: torch.device,
        fast_decode: bool = True,
        prefix_cache: PrefixCache | None = None,
        cuda_graphs: bool = False,
    ):
        self.model = model
        self.lora = lora
        self.device = device
        use_engine_attention(model)
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        config = model.config.get_text_config(decoder=True)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        kv_dtype = model.get_input_embeddings().weight.dtype  # the dtype keys and values are computed in
        self.kv = BatchKVCache(config.num_hidden_layers, kv_heads, head_dim, kv_dtype, device)
        # Llama-family decode steps skip transformers' per-layer plumbing (server/engine/llama_decode.py)
        self.fast_decode = (
            LlamaDecodeStep(model, self.kv) if fast_decode and supports_fast_decode(model) else None
        )
        self.prefix_cache = prefix_cache if prefix_cache is not None and prefix_cache.enabled else None
        if self.prefix_cache is not None:  # an adapter replaced in a slot: its blocks are stale
            lora.slot_listeners.append(self.prefix_cache.invalidate_slot)
        self.cuda_graphs = None
        if cuda_graphs and device.type == "cuda" and self.fast_decode is not None:
            from server.engine.cuda_graphs import CudaGraphDecoder

            self.cuda_graphs = CudaGraphDecoder(self.fast_decode, lora, self.kv)

    @torch.inference_mode()
    def prefill(self, prompts: list[tuple[list[int], int]]) -> list[tuple[torch.Tensor, int]]:
        """Prefills ``(prompt token ids, adapter slot)`` pairs in one forward pass and adds them to the
        batch cache; returns each prompt's last logits ``(V,)`` and its row."""
        return self.add_rows(self.prefill_forward(prompts))

    @torch.inference_mode()
    def prefill_forward(
        self,
        prompts: list[tuple[list[int], int]],
        prompt_logprobs: list[int | None] | None = None,
        cache_salts: list[str | None] | None = None,
        chunks: list[tuple[Prefilled | None, int | None]] | None = None,
    ) -> list[Prefilled]:
        """The forward pass of :meth:`prefill` alone: touches no batch state, so it may run in another
        thread while :meth:`decode` runs.

        Args:
            prompts: ``(prompt token ids, adapter slot)`` pairs, packed into one forward pass.
            prompt_logprobs: per prompt, how many alternatives to report for each of its tokens (None:
                not asked); the LM head then runs over that prompt's every position, for it alone.
            cache_salts: per prompt, its prefix-cache salt (its tenant), or None to bypass the cache.
            chunks: chunked prefill, per prompt ``(earlier, limit)``: ``earlier`` is the result of its
                earlier chunks (None: this is its first; a prefix-cache hit then starts it), ``limit``
                the most tokens to compute now (None: the rest). A result whose ``prompt_tokens`` is
                short of the prompt is the next chunk's ``earlier``. Not for prompt logprobs.
        """
        n = len(prompts)
        asked = prompt_logprobs or [None] * n
        chunks = chunks or [(None, None)] * n
        virtual = [self.lora.virtual_tokens.get(slot) for _, slot in prompts]  # prompt tuning, else None
        roots = [
            self._cache_root(slot, salt, tokens)
            for (_, slot), salt, tokens in zip(prompts, cache_salts or [None] * n, virtual)
        ]
        hits = [
            self.prefix_cache.lookup(root, ids)
            if root is not None and wants is None and earlier is None
            else None
            for (ids, _), root, wants, (earlier, _) in zip(prompts, roots, asked, chunks)
        ]
        # where each prompt's computed tokens start, and where they end this pass
        starts = [
            earlier.prompt_tokens if earlier is not None else _hit_tokens(hit)
            for (earlier, _), hit in zip(chunks, hits)
        ]
        ends = [
            len(ids) if limit is None else min(len(ids), start + limit)
            for (ids, _), start, (_, limit) in zip(prompts, starts, chunks)
        ]
        if any(a is not None and e < len(ids) for a, e, (ids, _) in zip(asked, ends, prompts)):
            raise ValueError("a prompt that asks for prompt logprobs is prefilled in one chunk")
        # a later chunk's virtual tokens are in its earlier chunks' keys and values already
        virtual = [None if earlier is not None else v for v, (earlier, _) in zip(virtual, chunks)]
        todo = [(ids[start:end], slot) for (ids, slot), start, end in zip(prompts, starts, ends)]
        lengths = [len(ids) + _count(v) for (ids, _), v in zip(todo, virtual)]
        bounds = [0, *itertools.accumulate(lengths)]
        input_ids = torch.tensor(
            [[t for ids, _ in todo for t in ids]], dtype=torch.long, device=self.device
        )  # (1, ΣT)
        inputs = {"input_ids": input_ids}
        if any(v is not None for v in virtual):
            inputs = {"inputs_embeds": self._with_virtual_tokens(input_ids, todo, virtual)}
        # prefix tuning's keys and values, then the prefix cache's: what each prompt attends to first
        tuned = [self.lora.prefixes.get(slot) for _, slot in prompts]
        prefixes = [
            _joined_prefix(p, hit) if earlier is None else _earlier_prefix(earlier)
            for p, hit, (earlier, _) in zip(tuned, hits, chunks)
        ]
        if any(p is not None for p in prefixes):
            inputs[PREFIX_KV_KWARG] = prefixes  # the attention's hook (server/engine/prefix_attention.py)
        firsts = [0 if p is None else p.num_virtual_tokens for p in prefixes]  # PEFT: after the prefix
        position_ids = torch.cat(
            [torch.arange(f, f + t, device=self.device) for f, t in zip(firsts, lengths)]
        )[None]  # (1, ΣT)
        cu = torch.tensor(bounds, dtype=torch.int32, device=self.device)
        ranges = [(slot, bounds[i], bounds[i + 1]) for i, (_, slot) in enumerate(prompts)]
        cache = DynamicCache()
        with self.lora.token_ranges(ranges):
            hidden = self.decoder(
                **inputs,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                cu_seq_lens_q=cu,
                cu_seq_lens_k=cu,
                max_length_q=max(lengths),
                max_length_k=max(lengths),
            ).last_hidden_state  # (1, ΣT, H)
        last = hidden[0].index_select(0, cu[1:].long() - 1)  # (n, H), contiguous
        logits = self.lm_head(last)  # (n, V)
        done = []
        for i, (start, end) in enumerate(zip(bounds, bounds[1:])):
            layers = _row_layers(cache, start, end, prefixes[i])
            ids, slot = prompts[i]
            if roots[i] is not None:
                self._remember(roots[i], (ids[: ends[i]], slot), layers, tuned[i], starts[i])
            earlier = chunks[i][0]
            done.append(
                Prefilled(
                    logits[i],
                    layers,
                    None
                    if asked[i] is None
                    else self._prompt_logprobs(hidden[0, start + _count(virtual[i]) : end], ids, asked[i]),
                    _hit_tokens(hits[i]) if earlier is None else earlier.cached_tokens,
                    ends[i],
                )
            )
        return done

    @torch.inference_mode()
    def remember_row(self, row: int, tokens: list[int], slot: int, salt: str | None) -> None:
        """Stores a finished row's whole blocks (its prompt and the tokens fed after it), so the next
        turn of a conversation, whose prompt repeats this one and its answer, starts from them."""
        root = self._cache_root(slot, salt, self.lora.virtual_tokens.get(slot))
        if root is None:
            return
        kv = self.kv
        columns = kv.mask[row, : kv.length].nonzero()
        if not len(columns):
            return
        tuned = self.lora.prefixes.get(slot)
        start = int(columns[0]) + (0 if tuned is None else tuned.num_virtual_tokens)
        fed = min(kv.length - start, len(tokens))  # the last sampled token has not been fed
        end = start + fed
        layers = [
            (kv.keys[i][row : row + 1, :, start:end], kv.values[i][row : row + 1, :, start:end])
            for i in range(kv.num_layers)
        ]  # per layer (1, KVH, fed, D)
        assert self.prefix_cache is not None
        self.prefix_cache.insert(root, slot, tokens[:fed], layers)

    def _cache_root(self, slot: int, salt: str | None, virtual_tokens: torch.Tensor | None) -> int | None:
        """The prefix-cache root of a prompt, or None when it bypasses the cache (no cache, no salt, or
        a prompt-tuning adapter, whose virtual tokens are not prompt tokens)."""
        if self.prefix_cache is None or salt is None or virtual_tokens is not None:
            return None
        return PrefixCache.root(slot, self.lora.slot_generations.get(slot, 0), salt)

    def _remember(
        self,
        root: int,
        prompt: tuple[list[int], int],
        layers: list[tuple[torch.Tensor, torch.Tensor]],
        tuned: PrefixKV | None,
        known_tokens: int,
    ) -> None:
        """Stores a prefilled prompt's whole blocks (its own tokens' columns, after any tuned prefix);
        the first ``known_tokens`` came from the cache or were stored by an earlier chunk."""
        skip = 0 if tuned is None else tuned.num_virtual_tokens
        own = [(k[:, :, skip:], v[:, :, skip:]) for k, v in layers]
        assert self.prefix_cache is not None
        block = self.prefix_cache.block_tokens
        self.prefix_cache.insert(root, prompt[1], prompt[0], own, known_tokens // block)

    def _prompt_logprobs(self, hidden: torch.Tensor, ids: list[int], top: int) -> list[TokenLogprob]:
        """Each prompt token's logprob given the tokens before it (positions 1..T-1), with ``top`` best."""
        logprobs = torch.log_softmax(self.lm_head(hidden[:-1]).float(), dim=-1)  # (T-1, V)
        targets = torch.tensor(ids[1:], dtype=torch.long, device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()  # (T-1,)
        if top > 0:
            values, best = torch.topk(logprobs, min(top, logprobs.shape[-1]), dim=-1)  # (T-1, top)
            tops = [tuple(zip(b, v)) for b, v in zip(best.tolist(), values.tolist())]
        else:
            tops = [()] * len(chosen)
        return [TokenLogprob(t, lp, top_) for t, lp, top_ in zip(ids[1:], chosen, tops)]

    def _with_virtual_tokens(
        self,
        input_ids: torch.Tensor,
        prompts: list[tuple[list[int], int]],
        virtual: list[torch.Tensor | None],
    ) -> torch.Tensor:
        """The packed prompts' embeddings with each prompt-tuned prompt's virtual tokens before it, as
        PEFT's ``PeftModelForCausalLM`` prepends them: ``(1, ΣT + Σn, H)``."""
        embeds = self.model.get_input_embeddings()(input_ids)[0]  # (ΣT, H)
        pieces, start = [], 0
        for (ids, _), tokens in zip(prompts, virtual):
            if tokens is not None:
                pieces.append(tokens.to(embeds.dtype))  # (n, H)
            pieces.append(embeds[start : start + len(ids)])
            start += len(ids)
        return torch.cat(pieces)[None]  # (1, ΣT + Σn, H)

    @torch.inference_mode()
    def add_rows(self, prefilled: list[Prefilled]) -> list[tuple[torch.Tensor, int]]:
        """Adds prefilled prompts to the batch cache; returns their logits and rows."""
        results: list[tuple[torch.Tensor, int]] = []
        try:
            for item in prefilled:
                results.append((item.logits, self.kv.add_row(item.layers)))
        except BaseException:  # e.g. out of memory growing the cache: leave the batch as it was
            for _, row in reversed(results):
                self.kv.remove_row(row)
            raise
        return results

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One tiny forward pass, before any concurrency: bitsandbytes repacks 4-bit weights for the
        CPU on their first use, which must not race between the decode and prefill threads."""
        self.prefill_forward([([0, 1], 0)])

    @torch.inference_mode()
    def decode(self, last_token_ids: list[int], slots: list[int]) -> torch.Tensor:
        """One decode step for all running rows (row ``i`` feeds ``last_token_ids[i]``); logits ``(B, V)``."""
        if self.cuda_graphs is not None:
            logits = self.cuda_graphs.decode(last_token_ids, slots)
            if logits is not None:
                return logits
        input_ids = torch.tensor(last_token_ids, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        attention, position_ids = self.kv.begin_step()
        with self.lora.rows(slots):
            if self.fast_decode is not None:
                logits = self.fast_decode(input_ids, attention, position_ids)
            else:
                logits = self.model(
                    input_ids=input_ids,
                    attention_mask=attention,
                    position_ids=position_ids,
                    past_key_values=self.kv.as_hf_cache(),
                    use_cache=True,
                ).logits[:, -1]
        self.kv.end_step()
        return logits

    def remove_row(self, row: int) -> int | None:
        return self.kv.remove_row(row)

    def reset_batch(self) -> None:
        """Drops every running row: the engine's recovery after a step failed midway."""
        self.kv.clear()


def _hit_tokens(hit: CachedPrefix | None) -> int:
    return 0 if hit is None else hit.num_tokens


def _joined_prefix(tuned: PrefixKV | None, hit: CachedPrefix | None) -> PrefixKV | None:
    """What a prompt attends to before its computed tokens: a tuned prefix, then its cached start."""
    if hit is None:
        return tuned
    if tuned is None:
        return PrefixKV(hit.keys, hit.values)
    return PrefixKV(
        torch.cat([tuned.keys.to(hit.keys), hit.keys], dim=2),
        torch.cat([tuned.values.to(hit.values), hit.values], dim=2),
    )  # (L, KVH, n + cached, D)


def _earlier_prefix(earlier: Prefilled) -> PrefixKV:
    """A chunk's start: every position its earlier chunks computed (tuned prefix, virtual tokens and
    prompt tokens alike), as one prefix ``(L, KVH, P, D)``; positions continue after it."""
    return PrefixKV(torch.cat([k for k, _ in earlier.layers]), torch.cat([v for _, v in earlier.layers]))


def _count(virtual_tokens: torch.Tensor | None) -> int:
    """How many virtual (prompt-tuning) positions precede a prompt's own tokens."""
    return 0 if virtual_tokens is None else virtual_tokens.shape[0]


def _row_layers(
    cache: DynamicCache, start: int, end: int, prefix: PrefixKV | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One packed prompt's per-layer ``(1, kv_heads, T, head_dim)`` K/V; a prefix-tuned prompt's prefix
    comes first (``(1, kv_heads, n + T, head_dim)``), so it lands in the KV cache just before the prompt."""
    layers = [(layer.keys[:, :, start:end], layer.values[:, :, start:end]) for layer in cache.layers]
    if prefix is None:
        return layers
    return [
        (
            torch.cat([prefix.keys[i][None].to(k), k], dim=2),
            torch.cat([prefix.values[i][None].to(v), v], dim=2),
        )
        for i, (k, v) in enumerate(layers)
    ]
