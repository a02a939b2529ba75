"""Chat completions: the tool-calling format and its streaming parser."""
