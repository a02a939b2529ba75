"""Training LoRA adapters (QLoRA) on the exact base model the server serves, and measuring them.

The daily loop: a JSONL dataset in → an adapter in the store (same base loader, same chat template,
same on-disk format as the server) → optionally hot-loaded into a running server → quality measured
with :mod:`training.evaluate`. This package imports :mod:`adapters` but never ``server``.
"""
