"""Text completions: ``POST /v1/completions``."""
