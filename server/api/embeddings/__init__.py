"""``POST /v1/embeddings``: the RAG embedder behind OpenAI's embeddings API."""
