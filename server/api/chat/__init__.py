"""Chat completions: ``POST /v1/chat/completions``, and the tool-calling format chat uses."""
