"""The model list: ``GET /v1/models``."""
