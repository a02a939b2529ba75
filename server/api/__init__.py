"""The HTTP edge: OpenAI-compatible routes, wire models and the error mapping."""
