"""One forward pass at a time over the running batch; every row carries its adapter slot."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from adapters.batched_lora import BatchedLoRAModel
from server.engine.kv_cache import BatchKVCache


class ModelRunner:
    """Owns the model's forward passes and the running batch's KV cache.

    Prefill runs one new sequence alone (its prompt has no padding, so its result is the same whatever
    else is running); decode runs one token for every running row together, each row with its own
    adapter, in a single forward pass.
    """

    def __init__(self, model: torch.nn.Module, lora: BatchedLoRAModel, device: torch.device):
        self.model = model
        self.lora = lora
        self.device = device
        config = model.config.get_text_config(decoder=True)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.kv = BatchKVCache(config.num_hidden_layers, kv_heads, head_dim, lora.dtype, device)

    @torch.inference_mode()
    def prefill(self, prompt_token_ids: list[int], slot: int) -> tuple[torch.Tensor, int]:
        """Runs a prompt alone, adds it to the batch cache; returns its last logits ``(V,)`` and its row."""
        input_ids = torch.tensor([prompt_token_ids], dtype=torch.long, device=self.device)  # (1, T)
        cache = DynamicCache()
        with self.lora.rows([slot]):
            out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        row = self.kv.add_row(layers)
        return out.logits[0, -1], row

    @torch.inference_mode()
    def decode(self, last_token_ids: list[int], slots: list[int]) -> torch.Tensor:
        """One decode step for all running rows (row ``i`` feeds ``last_token_ids[i]``); logits ``(B, V)``."""
        input_ids = torch.tensor(last_token_ids, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        attention, position_ids = self.kv.begin_step()
        with self.lora.rows(slots):
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=position_ids,
                past_key_values=self.kv.as_hf_cache(),
                use_cache=True,
            )
        self.kv.end_step()
        return out.logits[:, -1]

    def remove_row(self, row: int) -> int | None:
        return self.kv.remove_row(row)
