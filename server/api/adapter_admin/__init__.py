"""Adapter administration: list, load, unload, upload, delete, save merges (plus vLLM's routes)."""
