"""RAG collections: create, ingest, search, delete (``/v1/rag/...``)."""
