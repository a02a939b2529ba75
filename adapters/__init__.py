"""LoRA adapters: the on-disk format, validation, the resident registry and the batched LoRA layer."""
