"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's shape) with the generation model's tokenizer."""
